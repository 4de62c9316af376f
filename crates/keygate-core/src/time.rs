//! Timestamps: in key records, RFC 3339 text or integer Unix seconds, held as Unix milliseconds; in
//! usage reports, RFC 3339 UTC seconds ([`format_rfc3339`], [`parse_utc_seconds`]).

/// Parses an RFC 3339 timestamp (`2027-01-01T00:00:00Z`, `2027-01-01T01:00:00.250+01:00`) into Unix
/// milliseconds. Fractions finer than a millisecond are truncated, so a key never outlives its instant.
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let b = text.as_bytes();
    let bad = || format!("expected an RFC 3339 timestamp such as 2027-01-01T00:00:00Z, got {text:?}");
    if b.len() < 20 {
        return Err(bad());
    }
    let num =
        |from: usize, len: usize| -> Result<i64, String> {
            let digits = b.get(from..from + len).ok_or_else(bad)?;
            digits.iter().try_fold(0i64, |acc, &d| {
                if d.is_ascii_digit() {
                    Ok(acc * 10 + i64::from(d - b'0'))
                } else {
                    Err(bad())
                }
            })
        };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return Err(bad());
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    let mut at = 19;
    let mut millis = 0i64;
    if b.get(at) == Some(&b'.') {
        at += 1;
        let start = at;
        while let Some(&digit) = b.get(at).filter(|d| d.is_ascii_digit()) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(digit - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(bad());
        }
        for _ in (at - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') if at + 1 == b.len() => 0,
        Some(&sign @ (b'+' | b'-')) if at + 6 == b.len() && sep(at + 3, b":") => {
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if h > 23 || m > 59 {
                return Err(bad());
            }
            let minutes = h * 60 + m;
            if sign == b'+' {
                minutes
            } else {
                -minutes
            }
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(year, month, day);
    let seconds = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_minutes * 60;
    Ok(seconds * 1_000 + millis)
}

/// The latest instant [`format_rfc3339`] writes: 9999-12-31T23:59:59Z, in Unix seconds.
pub const MAX_RFC3339_SECONDS: i64 = 253_402_300_799;

/// Writes Unix seconds as RFC 3339 in UTC, to the second (`2026-12-03T14:00:09Z`). Seconds before
/// 1970 or after 9999 are written as the nearest of those two bounds.
pub fn format_rfc3339(seconds: i64) -> String {
    let seconds = seconds.clamp(0, MAX_RFC3339_SECONDS);
    let (days, in_day) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days);
    let (hour, minute, second) = (in_day / 3_600, in_day % 3_600 / 60, in_day % 60);
    format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
}

/// Reads exactly what [`format_rfc3339`] writes (UTC, whole seconds, `T` and `Z` in capitals) into
/// Unix seconds; any other spelling of an instant is refused.
pub fn parse_utc_seconds(text: &str) -> Result<i64, String> {
    let bad = || format!("expected an RFC 3339 UTC time to the second such as 2027-01-01T00:00:00Z, got {text:?}");
    let ms = parse_rfc3339(text).map_err(|_| bad())?;
    let seconds = ms.div_euclid(1_000);
    (format_rfc3339(seconds) == text).then_some(seconds).ok_or_else(bad)
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day counted from 1970-01-01 (the inverse of
/// [`days_from_civil`], Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_instants() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Ok(0));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00Z"), Ok(1_798_761_600_000));
        assert_eq!(parse_rfc3339("2000-02-29T12:34:56Z"), Ok(951_827_696_000));
    }

    #[test]
    fn offsets_and_fractions() {
        assert_eq!(parse_rfc3339("2027-01-01T01:00:00+01:00"), Ok(1_798_761_600_000));
        assert_eq!(parse_rfc3339("2026-12-31T23:00:00-01:00"), Ok(1_798_761_600_000));
        assert_eq!(parse_rfc3339("2027-01-01T00:00:00.25Z"), Ok(1_798_761_600_250));
        assert_eq!(parse_rfc3339("2027-01-01t00:00:00.123999z"), Ok(1_798_761_600_123));
    }

    #[test]
    fn rejects_malformed_timestamps() {
        for bad in [
            "",
            "2027-01-01",
            "2027-01-01T00:00:00",
            "2027-13-01T00:00:00Z",
            "2027-02-29T00:00:00Z",
            "2027-01-01T24:00:00Z",
            "2027-01-01T00:00:00.Z",
            "2027-01-01T00:00:00+0100",
            "2027-01-01T00:00:00Zjunk",
            "２027-01-01T00:00:00Z",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn utc_seconds_are_written_and_read_back() {
        assert_eq!(format_rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(1_798_761_600), "2027-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(format_rfc3339(-5), "1970-01-01T00:00:00Z");
        assert_eq!(format_rfc3339(i64::MAX), "9999-12-31T23:59:59Z");
        for s in [0, 59, 86_399, 86_400, 951_782_400, 1_798_761_599, 4_102_444_800, MAX_RFC3339_SECONDS] {
            assert_eq!(parse_utc_seconds(&format_rfc3339(s)), Ok(s), "{s}");
            assert_eq!(parse_rfc3339(&format_rfc3339(s)), Ok(s * 1_000), "{s}");
        }
        for day in (0..2_932_897i64).step_by(997) {
            assert_eq!(parse_utc_seconds(&format_rfc3339(day * 86_400 + 3_723)), Ok(day * 86_400 + 3_723));
        }
    }

    #[test]
    fn utc_seconds_refuse_every_other_spelling() {
        for bad in [
            "2027-01-01T00:00:00.000Z",
            "2027-01-01T01:00:00+01:00",
            "2027-01-01t00:00:00z",
            "2027-01-01 00:00:00Z",
            "2027-01-01T00:00:60Z",
            "2027-01-01T00:00:00",
            "",
        ] {
            assert!(parse_utc_seconds(bad).is_err(), "{bad:?} should be refused");
        }
    }
}
