//! How the fuzz targets read their input, and how a seed is written in the same shape. One file for both
//! sides, so the seeds `proto/tests/fuzz_seeds.rs` writes (it includes this file on stable) are what the
//! targets read. Nothing here needs libFuzzer or nightly.
//!
//! Every input decodes to something: a target never throws an input away for its shape, so libFuzzer's
//! mutations are never wasted on a format check.

/// Fields, one after another: a little-endian u16 length, then that many bytes. A length past the end of
/// the input takes what is left; a last lone byte (half a length) is ignored.
#[derive(Debug, Clone)]
pub struct Fields<'a> {
    rest: &'a [u8],
}

/// The fields of `input` (see [`Fields`]).
pub fn fields(input: &[u8]) -> Fields<'_> {
    Fields { rest: input }
}

impl<'a> Iterator for Fields<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_le_bytes(*len)).min(rest.len());
        let (field, rest) = rest.split_at(len);
        self.rest = rest;
        Some(field)
    }
}

/// The input [`fields`] reads back as `fields`. A field longer than 65535 bytes does not fit its length:
/// it is cut there.
pub fn encode_fields<'a>(fields: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for field in fields {
        let len = u16::try_from(field.len()).unwrap_or(u16::MAX);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&field[..usize::from(len)]);
    }
    out
}

/// A number from the first 8 bytes of `bytes`, little-endian, missing bytes zero: a short field makes a
/// small number, which is what body lengths mostly are.
pub fn le_u64(bytes: &[u8]) -> u64 {
    let mut word = [0; 8];
    let len = bytes.len().min(8);
    word[..len].copy_from_slice(&bytes[..len]);
    u64::from_le_bytes(word)
}

/// The shortest field [`le_u64`] reads back as `value`.
pub fn le_u64_field(value: u64) -> Vec<u8> {
    let bytes = value.to_le_bytes();
    let len = bytes.iter().rposition(|&b| b != 0).map_or(0, |last| last + 1);
    bytes[..len].to_vec()
}

/// `parse_split`'s input: a little-endian u16 (where to cut, modulo the length), then the bytes to parse.
pub fn split_point(input: &[u8]) -> (u16, &[u8]) {
    match input.split_first_chunk::<2>() {
        Some((at, bytes)) => (u16::from_le_bytes(*at), bytes),
        None => (0, &[]),
    }
}

/// The input [`split_point`] reads back as `(at, bytes)`.
pub fn encode_split_point(at: u16, bytes: &[u8]) -> Vec<u8> {
    [&at.to_le_bytes()[..], bytes].concat()
}

/// `response_head`'s input, as fields: the status, then the body length (an empty field: unknown, else
/// [`le_u64`]), then header names and values in turn (a name without a value is dropped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadInput<'a> {
    pub status: &'a [u8],
    pub body_len: Option<u64>,
    pub headers: Vec<(&'a [u8], &'a [u8])>,
}

impl<'a> HeadInput<'a> {
    pub fn decode(input: &'a [u8]) -> Self {
        let mut fields = fields(input);
        let status = fields.next().unwrap_or_default();
        let body_len = fields.next().filter(|field| !field.is_empty()).map(le_u64);
        let mut headers = Vec::new();
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            headers.push((name, value));
        }
        Self { status, body_len, headers }
    }

    pub fn encode(&self) -> Vec<u8> {
        // A known length of 0 must not read back as unknown: it takes one zero byte.
        let body_len = self.body_len.map(|len| if len == 0 { vec![0] } else { le_u64_field(len) });
        let mut all: Vec<&[u8]> = vec![self.status, body_len.as_deref().unwrap_or_default()];
        for (name, value) in &self.headers {
            all.extend([*name, *value]);
        }
        encode_fields(all)
    }
}

/// `body_framing`'s input, as fields: the declared length ([`le_u64`]), then the pieces the body arrives in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyInput<'a> {
    pub declared: u64,
    pub pieces: Vec<&'a [u8]>,
}

impl<'a> BodyInput<'a> {
    pub fn decode(input: &'a [u8]) -> Self {
        let mut fields = fields(input);
        let declared = fields.next().map_or(0, le_u64);
        Self { declared, pieces: fields.collect() }
    }

    pub fn encode(&self) -> Vec<u8> {
        let declared = le_u64_field(self.declared);
        encode_fields(std::iter::once(&declared[..]).chain(self.pieces.iter().copied()))
    }
}

/// `environ`'s key/value form (used when the input is not a whole uwsgi packet), as fields: keys and values
/// in turn. A key field of one byte below `KNOWN_KEYS.len()` stands for that key, so the names the mapping
/// treats apart are one byte away from any input; an empty key (which the packet grammar forbids) and a
/// key without a value are dropped.
pub fn environ_vars<'a>(input: &'a [u8], known_keys: &[&'a [u8]]) -> Vec<(&'a [u8], &'a [u8])> {
    let mut fields = fields(input);
    let mut vars = Vec::new();
    while let (Some(key), Some(value)) = (fields.next(), fields.next()) {
        let key = match key {
            [index] if usize::from(*index) < known_keys.len() => known_keys[usize::from(*index)],
            [] => continue,
            key => key,
        };
        vars.push((key, value));
    }
    vars
}

/// The input [`environ_vars`] reads back as `vars` (with keys written out, not as indexes).
pub fn encode_environ_vars(vars: &[(&[u8], &[u8])]) -> Vec<u8> {
    encode_fields(vars.iter().flat_map(|&(key, value)| [key, value]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_reads_back_what_was_written() {
        let fields_in: [&[u8]; 4] = [b"", b"a", &[0xff; 300], b"\r\n\0"];
        assert_eq!(fields(&encode_fields(fields_in)).collect::<Vec<_>>(), fields_in);
        for value in [0, 1, 255, 256, u64::MAX] {
            assert_eq!(le_u64(&le_u64_field(value)), value);
        }
        assert_eq!(split_point(&encode_split_point(513, b"packet")), (513, &b"packet"[..]));
        for body_len in [None, Some(0), Some(5), Some(u64::MAX)] {
            let head = HeadInput { status: b"200 OK", body_len, headers: vec![(b"A", b"1"), (b"B", b"")] };
            assert_eq!(HeadInput::decode(&head.encode()), head);
        }
        let body = BodyInput { declared: 70_000, pieces: vec![b"ab", b"", b"c"] };
        assert_eq!(BodyInput::decode(&body.encode()), body);
        let vars: [(&[u8], &[u8]); 2] = [(b"HTTPS", b"on"), (b"X", b"")];
        assert_eq!(environ_vars(&encode_environ_vars(&vars), &[b"KNOWN"]), vars);
    }

    #[test]
    fn any_bytes_decode() {
        assert_eq!(fields(&[5]).count(), 0);
        assert_eq!(fields(&[5, 0, b'a']).collect::<Vec<_>>(), [b"a"]);
        assert_eq!(split_point(&[1]), (0, &b""[..]));
        assert_eq!(
            environ_vars(&encode_fields([&[0][..], b"v", b"", b"w"]), &[b"KNOWN"]),
            [(&b"KNOWN"[..], &b"v"[..])]
        );
    }
}
