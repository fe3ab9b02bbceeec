//! Magento's JSON read without rounding money through `f64`.
//!
//! serde_json keeps a JSON number's text only with its `arbitrary_precision` feature, which
//! would change `serde_json::Number` for every crate of the workspace (feature unification:
//! untagged enums and flattened structs stop accepting numbers, equality becomes textual). So
//! order-ingest does it at its own boundary instead: before parsing, every number with a
//! fraction or an exponent is quoted (`12.50` becomes `"12.50"`), and [`Decimal4`] parses
//! that text exactly. Integers (ids, flags) stay numbers; a pass over the bytes costs far less
//! than the parse itself.
//!
//! [`Decimal4`]: elo_events::Decimal4

use std::borrow::Cow;

use serde_json::Value;

/// Parses JSON, keeping non-integer numbers as their exact text (JSON strings).
pub fn parse_lossless(bytes: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice(&quote_fractions(bytes))
}

/// Quotes every number token that has a `.`, `e` or `E`, outside strings (for readers that
/// take the bytes themselves, e.g. straight into typed structs). Borrows when there is none.
///
/// Strings are skipped with `memchr` (the crate serde_json's peers use for the same job): a
/// webhook is mostly string bytes, so the pass costs a few microseconds instead of a loop
/// over every byte.
pub fn quote_fractions(bytes: &[u8]) -> Cow<'_, [u8]> {
    let mut out: Option<Vec<u8>> = None;
    let (mut i, mut copied) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                while i < bytes.len() {
                    match memchr::memchr2(b'"', b'\\', &bytes[i..]) {
                        None => i = bytes.len(),
                        Some(at) if bytes[i + at] == b'\\' => i = (i + at + 2).min(bytes.len()),
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                    }
                }
            }
            b'-' | b'0'..=b'9' => {
                let start = i;
                while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                    i += 1;
                }
                let token = &bytes[start..i];
                if token.iter().any(|c| matches!(c, b'.' | b'e' | b'E')) {
                    let out = out.get_or_insert_with(|| Vec::with_capacity(bytes.len() + bytes.len() / 16));
                    out.extend_from_slice(&bytes[copied..start]);
                    out.push(b'"');
                    out.extend_from_slice(token);
                    out.push(b'"');
                    copied = i;
                }
            }
            _ => i += 1,
        }
    }
    match out {
        None => Cow::Borrowed(bytes),
        Some(mut out) => {
            out.extend_from_slice(&bytes[copied..]);
            Cow::Owned(out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractions_keep_their_text_and_everything_else_is_untouched() {
        let text = br#"{"a": 12.50, "b": [-0.0001, 7, 1e3], "c": "1.5 \"x\" 2.5", "d": {"e": -3}, "f": true}"#;
        let value = parse_lossless(text).unwrap();
        assert_eq!(value["a"], "12.50");
        assert_eq!(value["b"], serde_json::json!(["-0.0001", 7, "1e3"]));
        assert_eq!(value["c"], "1.5 \"x\" 2.5", "strings, escapes included, are not rewritten");
        assert_eq!((value["d"]["e"].as_i64(), value["f"].as_bool()), (Some(-3), Some(true)));
        assert!(parse_lossless(b"{\"a\": 1.2.3}").is_ok(), "malformed numbers become text, refused later");
        assert!(parse_lossless(b"{\"a\": }").is_err());
        assert!(matches!(quote_fractions(br#"{"a": [1, -2], "b": "3.5"}"#), Cow::Borrowed(_)), "nothing to quote");
        assert_eq!(
            &*quote_fractions(br#"["\\", 1.5, "x\"", 2e1, "unterminated 3.5"#),
            br#"["\\", "1.5", "x\"", "2e1", "unterminated 3.5"#
        );
        assert_eq!(&*quote_fractions(br#""ends in an escape \"#), br#""ends in an escape \"#);
    }
}
