//! Usage reports as `keygate serve` keeps them (`usage.jsonl`, one report per line) and
//! `keygate list --usage` sums them. A report is read by keygate-core's
//! [`Report::parse`](keygate_core::usage::Report::parse), the one reader of the format the filter
//! writes ([`Report::to_json`](keygate_core::usage::Report::to_json)): every member there, known
//! deny kinds, UTC times to the second, no name twice in one object. A report holds counts and key
//! ids, never a key.

use keygate_core::usage::{Report, ReportError};
use std::collections::{BTreeMap, HashSet};

/// Why a report is refused, as one line: the member and what is wrong with it, without the
/// core's `usage report: ` (the caller says what it was reading).
pub fn reason(e: &ReportError) -> String {
    match e {
        ReportError::Invalid(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// Reads and checks one report.
pub fn parse(text: &[u8]) -> Result<Report, String> {
    Report::parse(text).map_err(|e| reason(&e))
}

/// One key's use, summed over reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: u64,
    /// The latest `last_used`, in Unix milliseconds.
    pub last_used_ms: Option<i64>,
}

/// Every key's use in a file of reports, one per line. A report whose `batch_id` came before
/// counts once; a last line with no line ending (a report being written) is left out.
#[derive(Debug, Default)]
pub struct Usage {
    pub keys: BTreeMap<String, Totals>,
    pub reports: usize,
}

impl Usage {
    /// Reads `text`, the contents of a reports file; an error names the line (1-based).
    pub fn read(text: &[u8]) -> Result<Usage, (usize, String)> {
        let mut usage = Usage::default();
        let mut seen = HashSet::new();
        for (i, line) in complete_lines(text).enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let report = parse(line).map_err(|e| (i + 1, e))?;
            if seen.insert(report.batch_id.clone()) {
                usage.add(&report);
            }
        }
        Ok(usage)
    }

    pub fn add(&mut self, report: &Report) {
        self.reports += 1;
        for (id, used) in &report.keys {
            let totals = self.keys.entry(id.clone()).or_default();
            totals.requests = totals.requests.saturating_add(used.requests());
            totals.last_used_ms = totals.last_used_ms.max(Some(used.last_used_s.saturating_mul(1_000)));
        }
    }
}

/// The lines of `text` that end with a line ending, without it.
pub fn complete_lines(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let end = text.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    text.get(..end).unwrap_or_default().split_inclusive(|&c| c == b'\n').map(|l| l.strip_suffix(b"\n").unwrap_or(l))
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::reply::DenyKind;
    use keygate_core::time::parse_rfc3339;

    const GOOD: &str = r#"{"batch_id": "n1-1", "node": "envoy-1", "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:10Z",
        "keys": {"ab12cd34": {"allowed": 12, "denied": {"insufficient_scope": 1}, "last_used": "2026-12-03T14:00:09Z"}},
        "unattributed": {"missing_key": 3, "invalid_key": 5}, "dropped": 0}"#;

    fn with(from: &str, to: &str) -> String {
        GOOD.replacen(from, to, 1)
    }

    #[test]
    fn the_contract_reads_and_counts_allowed_and_denied() {
        let r = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(r.batch_id, "n1-1");
        assert_eq!(r.keys["ab12cd34"].requests(), 13);
        assert_eq!(r.unattributed.get(DenyKind::InvalidKey), 5);
    }

    #[test]
    fn what_the_filter_writes_is_what_is_read() {
        let r = parse(GOOD.as_bytes()).unwrap();
        assert_eq!(parse(&r.to_json()).unwrap(), r);
    }

    #[test]
    fn a_malformed_report_is_refused_naming_the_field() {
        let cases = [
            (String::new(), "the report is empty; expected a JSON object"),
            ("[]".to_string(), "expected a JSON object"),
            (with(r#""batch_id": "n1-1""#, r#""batch_id": """#), "batch_id: must be 1 to 256 bytes"),
            (with(r#""batch_id": "n1-1", "#, ""), "missing field `batch_id`"),
            (with(r#""node": "envoy-1", "#, ""), "missing field `node`"),
            (with(r#""dropped": 0"#, r#""dropped": -1"#), "dropped: invalid value: integer `-1`"),
            (with(r#""dropped": 0"#, r#""dropped": 0, "extra": 1"#), "extra: unknown field `extra`"),
            (with(r#""allowed": 12"#, r#""allowed": "12""#), "keys.ab12cd34.allowed: invalid type: string"),
            (with(r#""to": "2026-12-03T14:00:10Z""#, r#""to": "2026-12-03T13:00:00Z""#), "to: must not be earlier"),
            (
                with(r#""last_used": "2026-12-03T14:00:09Z""#, r#""last_used": "soon""#),
                "keys.ab12cd34.last_used: expected an RFC 3339",
            ),
            (with("14:00:09Z", "15:00:09+01:00"), "keys.ab12cd34.last_used: expected an RFC 3339 UTC time"),
            (with(r#""ab12cd34""#, r#""a b""#), "keys.a b: key id \"a b\" is not non-empty visible ASCII"),
            (with("insufficient_scope", "sleepy"), "unknown field `sleepy`"),
            (with(r#""missing_key": 3"#, r#""invalid_key": 3"#), "unattributed.invalid_key"),
            (GOOD.trim_end_matches('}').to_string(), "EOF while parsing"),
        ];
        for (text, want) in cases {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{text}\n  got:      {e}\n  expected: {want}");
        }
    }

    #[test]
    fn usage_sums_reports_once_each_and_keeps_the_latest_use() {
        let second = GOOD
            .replace("n1-1", "n1-2")
            .replace("14:00:09Z", "13:59:00Z")
            .replace("\"allowed\": 12", "\"allowed\": 100");
        let text =
            format!("{}\n{}\n{}\n\n", GOOD.replace('\n', " "), second.replace('\n', " "), GOOD.replace('\n', " "));
        let usage = Usage::read(text.as_bytes()).unwrap();
        assert_eq!(usage.reports, 2);
        let t = &usage.keys["ab12cd34"];
        assert_eq!(t.requests, 13 + 101);
        assert_eq!(t.last_used_ms, Some(parse_rfc3339("2026-12-03T14:00:09Z").unwrap()));
        let torn = format!("{}\n{{\"batch_id\": \"n1-", GOOD.replace('\n', " "));
        assert_eq!(Usage::read(torn.as_bytes()).unwrap().reports, 1);
        let bad = format!("{}\nnot json\n", GOOD.replace('\n', " "));
        assert_eq!(Usage::read(bad.as_bytes()).unwrap_err().0, 2);
    }
}
