//! Calendar arithmetic shared by the services (UTC, proleptic Gregorian), so the conversion is
//! written and tested once. Why not `chrono`/`time`: two functions do not justify a dependency
//! every service would compile.

/// `YYYY-MM-DD` of a day number since 1970-01-01 (Howard Hinnant's civil-from-days).
pub fn civil_date(days: i64) -> String {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `YYYY-MM-DD` of a UTC epoch-millisecond instant.
pub fn date_of_ms(ms: i64) -> String {
    civil_date(ms.div_euclid(86_400_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_around_epochs_and_leap_days() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(-1), "1969-12-31");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(date_of_ms(1_796_083_200_000), "2026-12-01");
        assert_eq!(date_of_ms(1_796_083_199_999), "2026-11-30");
    }
}
