//! Usage reports: what a filter sends to `POST /usage` of `keygate serve`, one per interval and
//! node, and what `keygate serve` keeps, one report per line of `usage.jsonl`.
//!
//! ```json
//! {"batch_id": "n1-42", "node": "envoy-1", "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:10Z",
//!  "keys": {"ab12cd34": {"allowed": 12, "denied": {"insufficient_scope": 1}, "last_used": "2026-12-03T14:00:09Z"}},
//!  "unattributed": {"missing_key": 3, "invalid_key": 5},
//!  "dropped": 0}
//! ```
//!
//! `batch_id`, `from`, `to` and `keys` are required; `node` (default `""`), `unattributed`, `dropped`
//! and, per key, `denied` and `last_used` may be left out. Any other member is refused, as is a name
//! given twice in one object. A report holds counts and key ids, never a key.
//!
//! This is the receiving side's reading of the contract: it checks everything it stores, whoever
//! sent it.

use keygate_core::json::parse_json;
use keygate_core::time::parse_rfc3339;
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::fmt;

/// The longest `batch_id`, `node` or key id a report may carry, in bytes.
pub const MAX_NAME: usize = 256;

/// One usage report.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    pub batch_id: String,
    #[serde(default)]
    pub node: String,
    pub from: String,
    pub to: String,
    #[serde(deserialize_with = "unique_names")]
    pub keys: BTreeMap<String, KeyUsage>,
    #[serde(default, deserialize_with = "unique_names")]
    pub unattributed: BTreeMap<String, u64>,
    #[serde(default)]
    pub dropped: u64,
}

/// What one key did in a report's interval.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KeyUsage {
    pub allowed: u64,
    #[serde(default, deserialize_with = "unique_names")]
    pub denied: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_used: Option<String>,
}

impl KeyUsage {
    /// Every request counted: allowed and denied.
    pub fn requests(&self) -> u64 {
        self.denied.values().fold(self.allowed, |sum, n| sum.saturating_add(*n))
    }
}

/// Why a report is refused: the field (`keys.ab12cd34.last_used`, empty for the whole report) and
/// what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.field.as_str() {
            "" => f.write_str(&self.message),
            field => write!(f, "{field}: {}", self.message),
        }
    }
}

fn refuse(field: impl Into<String>, message: impl Into<String>) -> ReportError {
    ReportError { field: field.into(), message: message.into() }
}

/// Reads and checks one report.
pub fn parse(text: &[u8]) -> Result<Report, ReportError> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(refuse("", "the report is empty; expected a JSON object"));
    }
    let report: Report = parse_json(text).map_err(|e| refuse(e.field.clone(), e.message()))?;
    check(&report)?;
    Ok(report)
}

/// A name a report may carry: 1 to [`MAX_NAME`] bytes, no control characters.
fn check_name(text: &str, field: &str, empty_ok: bool) -> Result<(), ReportError> {
    if text.is_empty() && !empty_ok {
        return Err(refuse(field, "must not be empty"));
    }
    if text.len() > MAX_NAME {
        return Err(refuse(field, format!("longer than {MAX_NAME} bytes")));
    }
    if text.chars().any(char::is_control) {
        return Err(refuse(field, "holds a control character"));
    }
    Ok(())
}

/// A key id or a deny kind: non-empty visible ASCII, as key records have them.
fn check_id(text: &str, field: &str) -> Result<(), ReportError> {
    if text.is_empty() || text.len() > MAX_NAME || !text.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(refuse(field, format!("expected 1 to {MAX_NAME} visible ASCII characters")));
    }
    Ok(())
}

fn check_time(text: &str, field: &str) -> Result<i64, ReportError> {
    parse_rfc3339(text).map_err(|m| refuse(field, m))
}

/// The checks serde's reading leaves: names, times, `from` not after `to`.
pub fn check(report: &Report) -> Result<(), ReportError> {
    check_name(&report.batch_id, "batch_id", false)?;
    check_name(&report.node, "node", true)?;
    let from = check_time(&report.from, "from")?;
    let to = check_time(&report.to, "to")?;
    if from > to {
        return Err(refuse("to", format!("{} is before from ({})", report.to, report.from)));
    }
    for (id, usage) in &report.keys {
        let here = format!("keys.{id}");
        check_id(id, "keys")?;
        for kind in usage.denied.keys() {
            check_id(kind, &format!("{here}.denied"))?;
        }
        if let Some(at) = &usage.last_used {
            check_time(at, &format!("{here}.last_used"))?;
        }
    }
    for kind in report.unattributed.keys() {
        check_id(kind, "unattributed")?;
    }
    Ok(())
}

/// A JSON object read into a map, refusing a name given twice (serde would keep the last, and a
/// key's counts would be lost).
fn unique_names<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Names<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Names<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if out.contains_key(&name) {
                    return Err(serde::de::Error::custom(format!("{name:?} is given twice")));
                }
                let value = map.next_value()?;
                out.insert(name, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Names(std::marker::PhantomData))
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
    pub fn read(text: &[u8]) -> Result<Usage, (usize, ReportError)> {
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
            // Checked when the report was read.
            let at = used.last_used.as_deref().and_then(|t| parse_rfc3339(t).ok());
            totals.last_used_ms = totals.last_used_ms.max(at);
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
        assert_eq!(r.unattributed["invalid_key"], 5);
        let minimal = r#"{"batch_id": "b", "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:00Z",
                          "keys": {"k": {"allowed": 0}}}"#;
        let r = parse(minimal.as_bytes()).unwrap();
        assert_eq!((r.node.as_str(), r.dropped, r.keys["k"].last_used.as_deref()), ("", 0, None));
    }

    #[test]
    fn a_malformed_report_is_refused_naming_the_field() {
        let cases = [
            (String::new(), "the report is empty; expected a JSON object"),
            ("[]".to_string(), "expected a JSON object"),
            (with(r#""batch_id": "n1-1""#, r#""batch_id": """#), "batch_id: must not be empty"),
            (with(r#""batch_id": "n1-1", "#, ""), "missing field `batch_id`"),
            (with(r#""dropped": 0"#, r#""dropped": -1"#), "dropped: invalid value: integer `-1`"),
            (with(r#""dropped": 0"#, r#""dropped": 0, "extra": 1"#), "extra: unknown field `extra`"),
            (with(r#""allowed": 12"#, r#""allowed": "12""#), "keys.ab12cd34.allowed: invalid type: string"),
            (
                with(r#""to": "2026-12-03T14:00:10Z""#, r#""to": "2026-12-03T13:00:00Z""#),
                "to: 2026-12-03T13:00:00Z is before from",
            ),
            (
                with(r#""last_used": "2026-12-03T14:00:09Z""#, r#""last_used": "soon""#),
                "keys.ab12cd34.last_used: expected an RFC 3339",
            ),
            (with(r#""ab12cd34""#, r#""a b""#), "keys: expected 1 to 256 visible ASCII characters"),
            (
                with(r#""missing_key": 3"#, r#""invalid_key": 3"#),
                "unattributed.invalid_key: \"invalid_key\" is given twice",
            ),
            (GOOD.trim_end_matches('}').to_string(), "EOF while parsing"),
        ];
        for (text, want) in cases {
            let e = parse(text.as_bytes()).unwrap_err().to_string();
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
