//! Magento's timestamps: `YYYY-MM-DD HH:MM:SS`, UTC whatever the store timezone.

/// Parses Magento's UTC `YYYY-MM-DD HH:MM:SS` (a `T` separator and fractions are tolerated).
pub fn parse_magento_time(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b' ' || b[10] == b'T')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let n = |r: std::ops::Range<usize>| text.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, s) = (n(0..4)?, n(5..7)?, n(8..10)?, n(11..13)?, n(14..16)?, n(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let days = era * 146_097 + yoe * 365 + yoe / 4 - yoe / 100 + doy - 719_468;
    Some((days * 86_400 + h * 3600 + mi * 60 + s) * 1000)
}

/// Formats epoch milliseconds as Magento's `YYYY-MM-DD HH:MM:SS` (UTC).
pub fn format_magento_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let rem = secs.rem_euclid(86_400);
    let date = elo_events::time::civil_date(secs.div_euclid(86_400));
    format!("{date} {:02}:{:02}:{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}
