//! PostgreSQL's text form of `bytea` back to the bytes it stands for.
//!
//! pgoutput sends every value in text format, so a `bytea` payload arrives as the
//! output of `byteaout` in the walsender's `bytea_output` setting: `hex` (the default,
//! `\x` then two hex digits per byte) or `escape` (printable bytes as they are, a
//! backslash doubled, any other byte as `\ooo` in octal). Both are decoded here, with
//! the rules of PostgreSQL's `byteain`, so the relay publishes exactly the bytes the
//! application stored, whichever setting the server has.
//!
//! Pure and total: any input gives bytes or a [`ByteaError`], never a panic (fuzz target
//! `bytea`, property tests below).

/// `pg_type.oid` of `bytea`, as a Relation message names a column's type.
pub const BYTEA_OID: u32 = 17;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ByteaError {
    #[error("invalid hexadecimal digit at byte {0} of the bytea text")]
    HexDigit(usize),
    #[error("odd number of hexadecimal digits in the bytea text")]
    OddHex,
    #[error(
        "invalid escape at byte {0} of the bytea text (a backslash takes \\\\ or 3 octal digits)"
    )]
    Escape(usize),
}

/// The bytes that `text` (one `byteaout` result, hex or escape format) stands for.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, ByteaError> {
    match text {
        [b'\\', b'x', hex @ ..] => decode_hex(hex),
        _ => decode_escape(text),
    }
}

/// Hex format after its `\x`. Like `byteain`, whitespace may separate the digit pairs
/// (PostgreSQL never writes any, but accepts it, and so does the relay).
fn decode_hex(hex: &[u8]) -> Result<Vec<u8>, ByteaError> {
    let mut out = Vec::with_capacity(hex.len() / 2);
    let mut i = 0;
    while i < hex.len() {
        if hex[i].is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let hi = digit(hex[i]).ok_or(ByteaError::HexDigit(i + 2))?;
        let lo = match hex.get(i + 1) {
            Some(&b) => digit(b).ok_or(ByteaError::HexDigit(i + 3))?,
            None => return Err(ByteaError::OddHex),
        };
        out.push(hi << 4 | lo);
        i += 2;
    }
    Ok(out)
}

fn digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Escape format: `\\` is one backslash, `\ooo` (first digit 0–3) one byte, anything
/// else a byte as it is.
fn decode_escape(text: &[u8]) -> Result<Vec<u8>, ByteaError> {
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while i < text.len() {
        if text[i] != b'\\' {
            out.push(text[i]);
            i += 1;
            continue;
        }
        match text.get(i + 1..i + 4) {
            _ if text.get(i + 1) == Some(&b'\\') => {
                out.push(b'\\');
                i += 2;
            }
            Some(&[a @ b'0'..=b'3', b @ b'0'..=b'7', c @ b'0'..=b'7']) => {
                out.push((a - b'0') << 6 | (b - b'0') << 3 | (c - b'0'));
                i += 4;
            }
            _ => return Err(ByteaError::Escape(i)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::fuzzing::{bytea_escape_out as escape_out, bytea_hex_out as hex_out};

    #[test]
    fn decodes_what_postgresql_writes() {
        // SELECT '\x00ff7b7d'::bytea under both settings.
        assert_eq!(decode(b"\\x00ff7b7d"), Ok(vec![0, 0xff, b'{', b'}']));
        assert_eq!(decode(b"\\000\\377{}"), Ok(vec![0, 0xff, b'{', b'}']));
        assert_eq!(decode(b"\\x"), Ok(vec![]));
        assert_eq!(decode(b""), Ok(vec![]));
        assert_eq!(decode(b"a\\\\b"), Ok(b"a\\b".to_vec()));
        assert_eq!(
            decode(b"\\xDE AD\tbe\nef"),
            Ok(vec![0xde, 0xad, 0xbe, 0xef])
        );
    }

    #[test]
    fn refuses_what_byteain_refuses() {
        assert_eq!(decode(b"\\x0"), Err(ByteaError::OddHex));
        assert_eq!(decode(b"\\x0g"), Err(ByteaError::HexDigit(3)));
        assert_eq!(decode(b"\\xzz"), Err(ByteaError::HexDigit(2)));
        assert_eq!(decode(b"\\x0 1"), Err(ByteaError::HexDigit(3)));
        assert_eq!(decode(b"ab\\"), Err(ByteaError::Escape(2)));
        assert_eq!(decode(b"\\400"), Err(ByteaError::Escape(0)));
        assert_eq!(decode(b"\\08"), Err(ByteaError::Escape(0)));
        assert_eq!(decode(b"\\12"), Err(ByteaError::Escape(0)));
    }

    proptest! {
        #[test]
        fn hex_output_decodes_to_the_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            prop_assert_eq!(decode(&hex_out(&bytes)), Ok(bytes));
        }

        #[test]
        fn escape_output_decodes_to_the_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            // Escape output never starts with `\x` (a backslash is doubled), so it is
            // never mistaken for hex.
            prop_assert_eq!(decode(&escape_out(&bytes)), Ok(bytes));
        }

        #[test]
        fn any_input_decodes_or_errs_and_decoded_bytes_round_trip(text in proptest::collection::vec(any::<u8>(), 0..256)) {
            if let Ok(bytes) = decode(&text) {
                prop_assert_eq!(decode(&hex_out(&bytes)), Ok(bytes.clone()));
                prop_assert_eq!(decode(&escape_out(&bytes)), Ok(bytes));
            }
        }
    }
}
