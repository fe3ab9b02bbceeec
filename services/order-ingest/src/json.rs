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

use serde_json::Value;

/// Parses JSON, keeping non-integer numbers as their exact text (JSON strings).
pub fn parse_lossless(bytes: &[u8]) -> serde_json::Result<Value> {
    serde_json::from_slice(&quote_fractions(bytes))
}

/// Quotes every number token that has a `.`, `e` or `E`, outside strings.
fn quote_fractions(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 16);
    let (mut i, mut in_string) = (0, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            out.push(b);
            match b {
                b'\\' if i + 1 < bytes.len() => {
                    out.push(bytes[i + 1]);
                    i += 1;
                }
                b'"' => in_string = false,
                _ => {}
            }
            i += 1;
        } else if b == b'"' {
            in_string = true;
            out.push(b);
            i += 1;
        } else if b == b'-' || b.is_ascii_digit() {
            let start = i;
            while i < bytes.len() && matches!(bytes[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                i += 1;
            }
            let token = &bytes[start..i];
            let fraction = token.iter().any(|c| matches!(c, b'.' | b'e' | b'E'));
            if fraction {
                out.push(b'"');
            }
            out.extend_from_slice(token);
            if fraction {
                out.push(b'"');
            }
        } else {
            out.push(b);
            i += 1;
        }
    }
    out
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
    }
}
