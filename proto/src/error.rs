//! `ProtocolError`: why a packet is malformed or oversized. It owns nothing else: running out of
//! buffered bytes is never an error here (parsers return `Ok(None)`), and I/O failures belong to
//! the server. The type is `Copy` and allocation-free so a parser can return it on a hot path and
//! the server can count it by [`ProtocolError::kind_label`] without formatting anything.

use std::fmt;

/// A packet that can never become valid, however many more bytes arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolError {
    /// The header announces a vars block larger than the configured `--buffer-size`
    /// ([`crate::Limits::max_datasize`]). Reported as soon as the header is in, so the server
    /// never buffers a block it will refuse.
    DataSizeTooLarge { size: u16, limit: u16 },
    /// A WSGI request (modifier1 0) with an empty vars block: there is no request to run.
    EmptyPacket,
    /// A var whose key length is 0. `offset` is where the record starts in the vars block.
    EmptyKey { offset: usize },
    /// A key length, key, value length or value runs past the end of the vars block.
    /// `offset` is where the record starts in the vars block.
    TruncatedRecord { offset: usize },
    /// The vars block holds more than [`crate::Limits::max_vars`] records.
    TooManyVars { limit: usize },
    /// Encoder only: a key, a value or the whole vars block does not fit its u16 length field.
    FieldTooLong,
}

impl ProtocolError {
    /// A short `snake_case` name for metrics labels and structured logs.
    pub fn kind_label(&self) -> &'static str {
        match self {
            Self::DataSizeTooLarge { .. } => "datasize_too_large",
            Self::EmptyPacket => "empty_packet",
            Self::EmptyKey { .. } => "empty_key",
            Self::TruncatedRecord { .. } => "truncated_record",
            Self::TooManyVars { .. } => "too_many_vars",
            Self::FieldTooLong => "field_too_long",
        }
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::DataSizeTooLarge { size, limit } => {
                write!(f, "vars block of {size} bytes exceeds --buffer-size {limit}")
            }
            Self::EmptyPacket => f.write_str("empty wsgi request: modifier1 0 with no vars"),
            Self::EmptyKey { offset } => write!(f, "var at byte {offset} of the vars block has an empty key"),
            Self::TruncatedRecord { offset } => {
                write!(f, "var at byte {offset} runs past the end of the vars block")
            }
            Self::TooManyVars { limit } => write!(f, "vars block has more than {limit} vars"),
            Self::FieldTooLong => f.write_str("key, value or vars block longer than 65535 bytes"),
        }
    }
}

impl std::error::Error for ProtocolError {}

#[cfg(test)]
mod tests {
    use super::ProtocolError;

    #[test]
    fn display_is_one_lowercase_line_naming_the_numbers() {
        let error = ProtocolError::DataSizeTooLarge { size: 65000, limit: 4096 };
        assert_eq!(error.to_string(), "vars block of 65000 bytes exceeds --buffer-size 4096");
        assert_eq!(
            ProtocolError::TruncatedRecord { offset: 17 }.to_string(),
            "var at byte 17 runs past the end of the vars block"
        );
        for error in [
            ProtocolError::EmptyPacket,
            ProtocolError::EmptyKey { offset: 0 },
            ProtocolError::TooManyVars { limit: 512 },
            ProtocolError::FieldTooLong,
        ] {
            let text = error.to_string();
            assert!(!text.contains('\n'), "{text:?}");
            assert!(text.starts_with(|c: char| !c.is_uppercase()), "{text:?}");
        }
    }

    #[test]
    fn kind_labels_are_distinct_snake_case() {
        let labels = [
            ProtocolError::DataSizeTooLarge { size: 1, limit: 0 },
            ProtocolError::EmptyPacket,
            ProtocolError::EmptyKey { offset: 0 },
            ProtocolError::TruncatedRecord { offset: 0 },
            ProtocolError::TooManyVars { limit: 0 },
            ProtocolError::FieldTooLong,
        ]
        .map(|error| error.kind_label());
        for (i, label) in labels.iter().enumerate() {
            assert!(label.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{label}");
            assert!(!labels[..i].contains(label), "duplicate label {label}");
        }
        assert_eq!(labels[0], "datasize_too_large");
    }
}
