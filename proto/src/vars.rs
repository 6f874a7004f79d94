//! The vars block: the CGI-style key/value records that follow the header. It owns the record
//! grammar and [`Vars`], a validated view that borrows the input and never copies or allocates.
//! What the vars mean to a WSGI app (which are left out, how repeats combine) is `environ`'s.

use std::iter::FusedIterator;

use nom::bytes::complete::take;
use nom::error::ErrorKind;
use nom::number::complete::le_u16;
use nom::IResult;

use crate::ProtocolError;

/// A validated vars block, borrowing the input.
///
/// Construction ([`parse_vars`]) validates every record once; iteration re-walks the block with
/// no error paths to report and no allocation. Keys and values are raw bytes (nginx copies them
/// byte for byte; WSGI decodes them as latin-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vars<'a> {
    block: &'a [u8],
    count: usize,
}

impl<'a> Vars<'a> {
    /// The records as `(key, value)`, in wire order, duplicates included.
    pub fn iter(&self) -> VarsIter<'a> {
        VarsIter { rest: self.block, remaining: self.count }
    }

    /// Number of records, duplicates included.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The value of `key`. If the key repeats (nginx before 1.23 sends a repeated client header
    /// as repeated records), the last occurrence wins, as in uWSGI.
    pub fn get(&self, key: &[u8]) -> Option<&'a [u8]> {
        self.iter().filter(|&(candidate, _)| candidate == key).map(|(_, value)| value).last()
    }

    /// The raw vars block, exactly as received.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.block
    }
}

impl<'a> IntoIterator for Vars<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = VarsIter<'a>;

    fn into_iter(self) -> VarsIter<'a> {
        self.iter()
    }
}

impl<'a> IntoIterator for &Vars<'a> {
    type Item = (&'a [u8], &'a [u8]);
    type IntoIter = VarsIter<'a>;

    fn into_iter(self) -> VarsIter<'a> {
        self.iter()
    }
}

/// Iterator over the records of a [`Vars`], in wire order.
#[derive(Debug, Clone)]
pub struct VarsIter<'a> {
    rest: &'a [u8],
    remaining: usize,
}

impl<'a> Iterator for VarsIter<'a> {
    type Item = (&'a [u8], &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        // `parse_vars` accepted every record of this block, so this cannot fail; if it somehow
        // did, ending the iteration is safer than panicking on wire bytes.
        let (rest, record) = parse_record(self.rest).ok()?;
        self.rest = rest;
        self.remaining -= 1;
        Some(record)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for VarsIter<'_> {}
impl FusedIterator for VarsIter<'_> {}

// record = key_len:u16le key:key_len*OCTET val_len:u16le value:val_len*OCTET   ; key_len >= 1
//
// Both lengths come from the wire; `length_data` compares each against the bytes left in the
// block before taking anything, so a length can never reach past the block (and nothing is
// allocated for it). Runs in nom's complete mode: the caller hands over the whole block, so
// running out of bytes here means truncated, not incomplete.
fn parse_record(input: &[u8]) -> IResult<&[u8], (&[u8], &[u8])> {
    let (input, key_len) = le_u16(input)?;
    if key_len == 0 {
        return Err(nom::Err::Error(nom::error::Error::new(input, ErrorKind::Verify)));
    }
    let (input, key) = take(key_len)(input)?;
    let (input, value_len) = le_u16(input)?;
    let (input, value) = take(value_len)(input)?;
    Ok((input, (key, value)))
}

// vars = record*          ; exactly `datasize` bytes, no padding, no terminator
/// Validates a whole vars block (the `datasize` bytes after the header).
///
/// Grammar: `record*`; `record = u16le key_len, key (key_len bytes, key_len >= 1), u16le val_len,
/// value (val_len bytes)`. Empty values are allowed (nginx sends `CONTENT_LENGTH` as `""` on a
/// GET). Rejects an empty key, a record running past the end of the block, and more than
/// `max_vars` records; the count is checked before each record is read, so an oversized block
/// costs at most `max_vars` record reads.
pub fn parse_vars(block: &[u8], max_vars: usize) -> Result<Vars<'_>, ProtocolError> {
    parse_vars_each(block, max_vars, |_, _| ())
}

/// [`parse_vars`], handing each record to `visit` in wire order as it is validated: a caller that needs
/// every record (a server indexing them) walks the block once instead of validating, then iterating.
/// On an error, `visit` has seen the records before the bad one.
pub fn parse_vars_each<'a>(
    block: &'a [u8],
    max_vars: usize,
    mut visit: impl FnMut(&'a [u8], &'a [u8]),
) -> Result<Vars<'a>, ProtocolError> {
    let mut rest = block;
    let mut count = 0;
    while !rest.is_empty() {
        if count == max_vars {
            return Err(ProtocolError::TooManyVars { limit: max_vars });
        }
        let offset = block.len() - rest.len();
        rest = match parse_record(rest) {
            Ok((after, (key, value))) => {
                visit(key, value);
                after
            }
            Err(nom::Err::Error(error) | nom::Err::Failure(error)) if error.code == ErrorKind::Verify => {
                return Err(ProtocolError::EmptyKey { offset });
            }
            // Complete mode reports a short block as an error, never as `Incomplete`; either way
            // the block is all there is, so the record is truncated.
            Err(_) => return Err(ProtocolError::TruncatedRecord { offset }),
        };
        count += 1;
    }
    Ok(Vars { block, count })
}

#[cfg(test)]
mod tests {
    use super::{parse_vars, parse_vars_each};
    use crate::ProtocolError;

    /// One record in wire form; lengths are taken from the slices (tests keep them small).
    fn record(key: &[u8], value: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&u16::try_from(key.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(&u16::try_from(value.len()).unwrap().to_le_bytes());
        bytes.extend_from_slice(value);
        bytes
    }

    #[test]
    fn reference_example_block() {
        // From the protocol reference: the 35-byte block after header 00 23 00 00.
        let block = b"\x0e\x00REQUEST_METHOD\x03\x00GET\x09\x00PATH_INFO\x01\x00/";
        assert_eq!(block.len(), 35);
        let vars = parse_vars(block, 10).unwrap();
        assert_eq!(vars.len(), 2);
        assert_eq!(
            vars.iter().collect::<Vec<_>>(),
            [(&b"REQUEST_METHOD"[..], &b"GET"[..]), (&b"PATH_INFO"[..], &b"/"[..])]
        );
        assert_eq!(vars.get(b"PATH_INFO"), Some(&b"/"[..]));
        assert_eq!(vars.get(b"path_info"), None, "keys are compared byte for byte");
        assert_eq!(vars.as_bytes(), block);
    }

    #[test]
    fn each_record_is_visited_once_in_wire_order() {
        let block = [record(b"A", b"1"), record(b"B", b""), record(b"A", b"2")].concat();
        let mut seen = Vec::new();
        let vars = parse_vars_each(&block, 10, |key, value| seen.push((key, value))).unwrap();
        assert_eq!(seen, vars.iter().collect::<Vec<_>>());
        assert_eq!(seen.len(), 3);
        // An error stops the walk at the bad record.
        let bad = [record(b"A", b"1"), b"\x05\x00K".to_vec()].concat();
        let mut seen = 0;
        assert!(parse_vars_each(&bad, 10, |_, _| seen += 1).is_err());
        assert_eq!(seen, 1);
    }

    #[test]
    fn empty_block_has_no_vars() {
        let vars = parse_vars(b"", 10).unwrap();
        assert!(vars.is_empty());
        assert_eq!(vars.iter().next(), None);
    }

    #[test]
    fn empty_value_is_allowed_and_distinct_from_absent() {
        let block = [record(b"CONTENT_LENGTH", b""), record(b"QUERY_STRING", b"")].concat();
        let vars = parse_vars(&block, 10).unwrap();
        assert_eq!(vars.get(b"CONTENT_LENGTH"), Some(&b""[..]));
        assert_eq!(vars.get(b"HTTPS"), None);
    }

    #[test]
    fn duplicate_key_last_occurrence_wins_but_iteration_keeps_both() {
        let block =
            [record(b"HTTP_COOKIE", b"a=1"), record(b"HTTP_HOST", b"x"), record(b"HTTP_COOKIE", b"b=2")]
                .concat();
        let vars = parse_vars(&block, 10).unwrap();
        assert_eq!(vars.get(b"HTTP_COOKIE"), Some(&b"b=2"[..]));
        let cookies: Vec<_> = vars.iter().filter(|(key, _)| *key == b"HTTP_COOKIE").collect();
        assert_eq!(cookies.len(), 2);
    }

    #[test]
    fn iterator_reports_exact_size() {
        let block = [record(b"A", b"1"), record(b"B", b"2"), record(b"C", b"3")].concat();
        let vars = parse_vars(&block, 10).unwrap();
        let mut iter = vars.iter();
        assert_eq!(iter.len(), 3);
        iter.next();
        assert_eq!(iter.len(), 2);
        assert_eq!((&vars).into_iter().count(), 3);
    }

    #[test]
    fn empty_key_is_rejected_at_its_record_offset() {
        let first = record(b"A", b"1");
        let block = [first.clone(), record(b"", b"value")].concat();
        assert_eq!(parse_vars(&block, 10), Err(ProtocolError::EmptyKey { offset: first.len() }));
        // The key length is checked before the value: an empty key with nothing after it is
        // still reported as an empty key (uWSGI checks in the same order).
        assert_eq!(parse_vars(b"\x00\x00", 10), Err(ProtocolError::EmptyKey { offset: 0 }));
    }

    #[test]
    fn every_kind_of_truncation_is_rejected_at_the_record_offset() {
        let first = record(b"A", b"1");
        let offset = first.len();
        let whole = record(b"KEY", b"value");
        // Cut the second record inside each of its four fields.
        let cases: [(&str, usize); 4] = [
            ("key length", 1), // one byte of the u16 key length
            ("key", 2 + 2),    // key length + 2 of the 3 key bytes
            ("value length", 2 + 3 + 1),
            ("value", 2 + 3 + 2 + 4),
        ];
        for (field, cut) in cases {
            let block = [&first[..], &whole[..cut]].concat();
            assert_eq!(
                parse_vars(&block, 10),
                Err(ProtocolError::TruncatedRecord { offset }),
                "truncated {field}"
            );
        }
        // A length that claims far more than the block holds is bounded, not trusted.
        assert_eq!(parse_vars(b"\xff\xffKEY", 10), Err(ProtocolError::TruncatedRecord { offset: 0 }));
    }

    #[test]
    fn too_many_vars_is_rejected_only_past_the_limit() {
        let block = [record(b"A", b"1"), record(b"B", b"2"), record(b"C", b"3")].concat();
        assert_eq!(parse_vars(&block, 3).unwrap().len(), 3);
        assert_eq!(parse_vars(&block, 2), Err(ProtocolError::TooManyVars { limit: 2 }));
        assert_eq!(parse_vars(b"", 0).unwrap().len(), 0);
    }
}
