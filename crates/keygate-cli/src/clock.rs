//! The current time, RFC 3339 formatting, and `--expires` values (`90d`, `12h`, `2w`, or a time).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now.
pub fn now_ms() -> Result<i64, String> {
    let since =
        SystemTime::now().duration_since(UNIX_EPOCH).map_err(|_| "the system clock is before 1970".to_string())?;
    i64::try_from(since.as_millis()).map_err(|_| "the system clock is out of range".to_string())
}

/// `2027-02-21T10:00:00Z` for a Unix time in milliseconds (sub-second part dropped).
pub fn format_rfc3339(ms: i64) -> String {
    let seconds = ms.div_euclid(1_000);
    let days = seconds.div_euclid(86_400);
    let of_day = seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", of_day / 3_600, of_day % 3_600 / 60, of_day % 60)
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm, the
/// inverse of `days_from_civil` in the library's `time` module).
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

/// What to write as a record's `expires_at` for `--expires TEXT`, given the time now: a duration
/// (`90d`, `36h`, `2w`) from now, in UTC, or an RFC 3339 time kept as written. Refuses a time
/// that is not in the future: such a key would never work.
pub fn expires_at(text: &str, now_ms: i64) -> Result<String, String> {
    let bad = || {
        format!("--expires: expected a duration such as 90d, 36h or 2w, or a time such as 2027-01-01T00:00:00Z; got {text:?}")
    };
    let unit_ms: Option<i64> = match text.as_bytes().last() {
        Some(b'h') => Some(3_600_000),
        Some(b'd') => Some(86_400_000),
        Some(b'w') => Some(7 * 86_400_000),
        _ => None,
    };
    let at_ms = match unit_ms {
        Some(unit) => {
            let digits = text.get(..text.len() - 1).unwrap_or_default();
            if digits.is_empty() || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return Err(bad());
            }
            let count: i64 = digits.parse().map_err(|_| bad())?;
            count
                .checked_mul(unit)
                .and_then(|d| d.checked_add(now_ms))
                .filter(|at| *at < 253_402_300_800_000) // year 10000: RFC 3339 has four-digit years
                .ok_or_else(|| format!("--expires: {text} is too far in the future"))?
        }
        None => keygate_core::time::parse_rfc3339(text).map_err(|_| bad())?,
    };
    if at_ms <= now_ms {
        return Err(format!("--expires: {text} is not in the future, so the key would never work"));
    }
    Ok(match unit_ms {
        // Whole seconds, rounded up, so the key lasts at least as long as asked.
        Some(_) => format_rfc3339(at_ms + 999),
        None => text.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::time::parse_rfc3339;

    #[test]
    fn formats_what_the_library_parses() {
        for text in [
            "1970-01-01T00:00:00Z",
            "2000-02-29T12:34:56Z",
            "2027-02-21T10:00:00Z",
            "2100-12-31T23:59:59Z",
            "1969-12-31T23:59:59Z",
        ] {
            let ms = parse_rfc3339(text).unwrap();
            assert_eq!(format_rfc3339(ms), text);
        }
        assert_eq!(format_rfc3339(1_798_761_600_250), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn durations_count_from_now_in_utc() {
        let now = parse_rfc3339("2026-11-23T10:00:00Z").unwrap();
        assert_eq!(expires_at("90d", now).unwrap(), "2027-02-21T10:00:00Z");
        assert_eq!(expires_at("36h", now).unwrap(), "2026-11-24T22:00:00Z");
        assert_eq!(expires_at("2w", now).unwrap(), "2026-12-07T10:00:00Z");
        assert_eq!(expires_at("1d", now + 1).unwrap(), "2026-11-24T10:00:01Z");
        assert_eq!(expires_at("2027-01-01T01:00:00+01:00", now).unwrap(), "2027-01-01T01:00:00+01:00");
    }

    #[test]
    fn refuses_bad_or_past_expiry() {
        let now = parse_rfc3339("2026-11-23T10:00:00Z").unwrap();
        for bad in [
            "",
            "d",
            "90",
            "-1d",
            "1.5d",
            "90m",
            "tomorrow",
            "2027-01-01",
            "0d",
            "2020-01-01T00:00:00Z",
            "99999999999999d",
        ] {
            assert!(expires_at(bad, now).is_err(), "{bad:?} should be refused");
        }
    }
}
