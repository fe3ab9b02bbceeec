//! Money and quantities as fixed-point decimals.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A decimal with exactly four fractional digits, stored as the unscaled integer.
///
/// On the wire it is Avro `{"type":"bytes","logicalType":"decimal","precision":18,"scale":4}`:
/// the unscaled value as big-endian two's complement, which every Avro implementation reads
/// as a decimal. Four digits cover every ISO 4217 currency and Magento's quantity precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Decimal4(i64);

/// Error parsing a decimal from text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid decimal {input:?}: {reason}")]
pub struct ParseDecimalError {
    input: String,
    reason: &'static str,
}

impl Decimal4 {
    /// Scale factor between the value and its unscaled integer.
    pub const SCALE: i64 = 10_000;
    /// Zero.
    pub const ZERO: Decimal4 = Decimal4(0);

    /// Builds from the unscaled integer (`12345` is `1.2345`).
    pub const fn from_unscaled(unscaled: i64) -> Self {
        Self(unscaled)
    }

    /// The unscaled integer.
    pub const fn unscaled(self) -> i64 {
        self.0
    }

    /// Builds from a whole number of units.
    pub const fn from_units(units: i64) -> Self {
        Self(units * Self::SCALE)
    }

    /// Adds, failing on overflow instead of wrapping.
    pub fn checked_add(self, other: Self) -> Option<Self> {
        self.0.checked_add(other.0).map(Self)
    }

    /// Parses a JSON number as Magento sends it (`12.5`, `-3`, `1e2` is refused) without going
    /// through a float, rounding half away from zero past four digits.
    pub fn parse(input: &str) -> Result<Self, ParseDecimalError> {
        let err = |reason| ParseDecimalError { input: input.to_owned(), reason };
        let s = input.trim();
        let (negative, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if whole.is_empty() && frac.is_empty() {
            return Err(err("no digits"));
        }
        if !whole.chars().chain(frac.chars()).all(|c| c.is_ascii_digit()) {
            return Err(err("not a plain decimal number"));
        }
        let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| err("too large"))? };
        let mut frac_digits: Vec<u8> = frac.bytes().map(|b| b - b'0').collect();
        let round_up = frac_digits.get(4).is_some_and(|d| *d >= 5);
        frac_digits.resize(4, 0);
        let frac_value = frac_digits.iter().fold(0i64, |acc, d| acc * 10 + i64::from(*d));
        let mut unscaled =
            whole.checked_mul(Self::SCALE).and_then(|w| w.checked_add(frac_value)).ok_or_else(|| err("too large"))?;
        if round_up {
            unscaled = unscaled.checked_add(1).ok_or_else(|| err("too large"))?;
        }
        Ok(Self(if negative { -unscaled } else { unscaled }))
    }

    #[cfg(test)]
    fn to_be_bytes_minimal(self) -> Vec<u8> {
        let bytes = self.0.to_be_bytes();
        // Drop leading bytes that only repeat the sign, as Java's BigInteger.toByteArray does.
        let mut start = 0;
        while start < 7 {
            let (b, next) = (bytes[start], bytes[start + 1]);
            let redundant = (b == 0x00 && next & 0x80 == 0) || (b == 0xff && next & 0x80 != 0);
            if !redundant {
                break;
            }
            start += 1;
        }
        bytes[start..].to_vec()
    }

    fn from_be_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() {
            return Some(Self(0));
        }
        if bytes.len() > 8 {
            // Wider values are only acceptable when the extra bytes are sign extension.
            let (extra, rest) = bytes.split_at(bytes.len() - 8);
            let fill = if rest[0] & 0x80 != 0 { 0xff } else { 0x00 };
            if extra.iter().any(|b| *b != fill) {
                return None;
            }
            return Self::from_be_bytes(rest);
        }
        let fill = if bytes[0] & 0x80 != 0 { 0xff } else { 0x00 };
        let mut buf = [fill; 8];
        buf[8 - bytes.len()..].copy_from_slice(bytes);
        Some(Self(i64::from_be_bytes(buf)))
    }
}

impl fmt::Display for Decimal4 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        write!(f, "{sign}{}.{:04}", abs / 10_000, abs % 10_000)
    }
}

impl FromStr for Decimal4 {
    type Err = ParseDecimalError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for Decimal4 {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        // Always eight bytes: apache-avro 0.22's resolver rejects a decimal(18,_) whose byte
        // string is shorter than what precision 18 needs (it checks the wrong direction), and
        // other Avro implementations accept any length.
        serializer.serialize_bytes(&self.0.to_be_bytes())
    }
}

impl<'de> Deserialize<'de> for Decimal4 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DecimalVisitor;
        impl<'de> Visitor<'de> for DecimalVisitor {
            type Value = Decimal4;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal(18,4) as big-endian two's complement bytes")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Decimal4, E> {
                Decimal4::from_be_bytes(v).ok_or_else(|| E::custom("decimal out of range"))
            }
            fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Decimal4, E> {
                self.visit_bytes(&v)
            }
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Decimal4, A::Error> {
                let mut bytes = Vec::new();
                while let Some(b) = seq.next_element::<u8>()? {
                    bytes.push(b);
                }
                self.visit_bytes(&bytes)
            }
        }
        deserializer.deserialize_bytes(DecimalVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_magento_numbers_without_floats() {
        assert_eq!(Decimal4::parse("12.5").unwrap().unscaled(), 125_000);
        assert_eq!(Decimal4::parse("-0.0001").unwrap().unscaled(), -1);
        assert_eq!(Decimal4::parse("0.1").unwrap().to_string(), "0.1000");
        assert_eq!(Decimal4::parse("19.99999").unwrap().to_string(), "20.0000");
        assert_eq!(Decimal4::parse("7").unwrap(), Decimal4::from_units(7));
        assert!(Decimal4::parse("1e3").is_err());
        assert!(Decimal4::parse("").is_err());
        assert!(Decimal4::parse("99999999999999999999").is_err());
    }

    #[test]
    fn byte_encoding_is_minimal_twos_complement() {
        for (value, expected) in [
            (0i64, vec![0x00]),
            (127, vec![0x7f]),
            (128, vec![0x00, 0x80]),
            (-1, vec![0xff]),
            (-128, vec![0x80]),
            (-129, vec![0xff, 0x7f]),
        ] {
            let d = Decimal4::from_unscaled(value);
            assert_eq!(d.to_be_bytes_minimal(), expected, "{value}");
            assert_eq!(Decimal4::from_be_bytes(&expected), Some(d));
        }
        for v in [i64::MIN, i64::MAX, 123_456_789, -987_654_321] {
            let d = Decimal4::from_unscaled(v);
            assert_eq!(Decimal4::from_be_bytes(&d.to_be_bytes_minimal()), Some(d));
        }
        assert_eq!(Decimal4::from_be_bytes(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 5]), Some(Decimal4(5)));
        assert_eq!(Decimal4::from_be_bytes(&[1, 0, 0, 0, 0, 0, 0, 0, 0]), None);
    }
}
