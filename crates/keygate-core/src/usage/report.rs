//! The usage report: what one POST carries to the receiver, written by [`Report::to_json`] and
//! read back, strictly and within limits, by [`Report::parse`] (the receiver's side).
//!
//! ```json
//! {"batch_id": "node-1/1764770000000-2/3", "node": "node-1",
//!  "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:10Z",
//!  "keys": {"ab12cd34": {"allowed": 12, "denied": {"insufficient_scope": 1}, "last_used": "2026-12-03T14:00:09Z"}},
//!  "unattributed": {"missing_key": 3, "invalid_key": 5},
//!  "dropped": 0}
//! ```
//!
//! Every member is always there; the deny-kind objects (`denied`, `unattributed`) leave out the
//! kinds counted zero times. Times are RFC 3339 in UTC, to the second. Written compactly, on one
//! line; the reporter writes the keys in no particular order, [`Report::to_json`] in byte order of
//! their ids.

use crate::error::{ConfigError, ErrorKind};
use crate::json::{parse_json, repeated_name};
use crate::keys::record::id_is_valid;
use crate::reply::DenyKind;
use crate::time::{format_rfc3339, parse_utc_seconds};
use crate::usage::tally::{DenyCounts, KeyUsage, Tally};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;

/// Longest `node` written or read; a longer node id is cut to it (at a character boundary).
pub const MAX_NODE_BYTES: usize = 200;
/// Longest `batch_id` read: a node, the three numbers (20, 10 and 20 characters at most) and what
/// separates them fit (253 bytes).
pub const MAX_BATCH_ID_BYTES: usize = 256;

/// The deny kinds' names, as stats and reports spell them, in the order of [`DenyKind::ALL`].
pub const KIND_NAMES: [&str; DenyKind::ALL.len()] = [
    "missing_key",
    "invalid_key",
    "revoked_key",
    "expired_key",
    "insufficient_scope",
    "forbidden",
    "key_set_unavailable",
];

/// One report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The same on every attempt to send this report, and on no other report ([`batch_id`]).
    pub batch_id: String,
    /// The reporting Envoy's node id; empty when unknown.
    pub node: String,
    /// The interval covered, in Unix seconds: from the previous report's end (or the reporter's
    /// start) to when this one was made.
    pub from_s: i64,
    pub to_s: i64,
    pub keys: BTreeMap<String, KeyUsage>,
    /// Refusals with no key id: a missing, malformed or unknown key, and the like.
    pub unattributed: DenyCounts,
    /// Requests of a key that no entry could be kept for (`usage.max_pending_keys` reached).
    pub dropped: u64,
}

/// The `batch_id` of report number `sequence` of reporter number `reporter` of its process (a
/// number no other reporter of the process has, such as a wasm VM's), started at `epoch_ms`
/// (wall-clock Unix milliseconds) on `node`: `<node>/<epoch_ms>-<reporter>/<sequence>`. A reporter
/// numbers its reports from 1; two reporters of one process started in the same millisecond have
/// different numbers, and a later process of the node starts at a later millisecond, so no two
/// reports share an id, across restarts too, with no random source.
pub fn batch_id(node: &str, epoch_ms: i64, reporter: u32, sequence: u64) -> String {
    format!("{node}/{epoch_ms}-{reporter}/{sequence}")
}

/// `node` cut to [`MAX_NODE_BYTES`] at a character boundary.
pub fn clip_node(node: &str) -> &str {
    let mut end = node.len().min(MAX_NODE_BYTES);
    while !node.is_char_boundary(end) {
        end -= 1;
    }
    node.get(..end).unwrap_or_default()
}

/// What [`Report::parse_within`] accepts at most.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLimits {
    pub max_bytes: usize,
    pub max_keys: usize,
}

impl Default for ReportLimits {
    /// 64 MiB, about 600 000 keys of 16-character ids with one deny kind each (a receiver of larger
    /// reports raises it), and a million keys, the largest `usage.max_pending_keys`.
    fn default() -> Self {
        ReportLimits { max_bytes: 64 << 20, max_keys: 1_000_000 }
    }
}

/// Why a report is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReportError {
    /// Longer than the limit; not read.
    TooLarge { bytes: usize, limit: usize },
    /// More keys than the limit.
    TooManyKeys { keys: usize, limit: usize },
    /// Not a report: the member, what is wrong with it and where (as for a configuration).
    Invalid(ConfigError),
}

impl fmt::Display for ReportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReportError::TooLarge { bytes, limit } => {
                write!(f, "usage report: {bytes} bytes, more than the limit ({limit})")
            }
            ReportError::TooManyKeys { keys, limit } => {
                write!(f, "usage report: {keys} keys, more than the limit ({limit})")
            }
            ReportError::Invalid(e) => write!(f, "usage report: {e}"),
        }
    }
}

impl std::error::Error for ReportError {}

impl Report {
    /// The report of `tally`'s counts.
    pub fn new(batch_id: String, node: &str, from_s: i64, to_s: i64, tally: Tally) -> Self {
        let (unattributed, dropped) = (*tally.unattributed(), tally.dropped());
        let keys = tally.into_keys().into_iter().collect();
        Report { batch_id, node: clip_node(node).to_string(), from_s, to_s, keys, unattributed, dropped }
    }

    /// Every request counted, dropped ones included.
    pub fn requests(&self) -> u64 {
        let all = self.unattributed.total().saturating_add(self.dropped);
        self.keys.values().fold(all, |sum, usage| sum.saturating_add(usage.requests()))
    }

    /// The report's JSON text, its keys in byte order of their ids.
    pub fn to_json(&self) -> Vec<u8> {
        let head = Head { batch_id: &self.batch_id, node: &self.node, from_s: self.from_s, to_s: self.to_s };
        write_json(&head, self.keys.iter().map(|(id, usage)| (id.as_str(), usage)), &self.unattributed, self.dropped)
    }

    /// Reads a report within the default limits ([`ReportLimits::default`]).
    pub fn parse(text: &[u8]) -> Result<Report, ReportError> {
        Report::parse_within(text, &ReportLimits::default())
    }

    /// Reads a report: exactly the members [`Report::to_json`] writes, each of its type, key ids as
    /// key records spell them (visible ASCII), known deny kinds, no name twice in one object, times
    /// as written (UTC, to the second), `from` no later than `to`; no larger than `limits`.
    pub fn parse_within(text: &[u8], limits: &ReportLimits) -> Result<Report, ReportError> {
        if text.len() > limits.max_bytes {
            return Err(ReportError::TooLarge { bytes: text.len(), limit: limits.max_bytes });
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            let empty = ConfigError::of_kind(ErrorKind::Syntax, "", "the report is empty; expected a JSON object");
            return Err(ReportError::Invalid(empty));
        }
        let raw: RawReport = parse_json(text).map_err(ReportError::Invalid)?;
        if raw.keys.0.len() > limits.max_keys {
            return Err(ReportError::TooManyKeys { keys: raw.keys.0.len(), limit: limits.max_keys });
        }
        let refuse = |field: &str, reason: &str| Err(ReportError::Invalid(ConfigError::new(field, reason)));
        if raw.batch_id.is_empty() || raw.batch_id.len() > MAX_BATCH_ID_BYTES {
            return refuse("batch_id", &format!("must be 1 to {MAX_BATCH_ID_BYTES} bytes"));
        }
        if raw.node.len() > MAX_NODE_BYTES {
            return refuse("node", &format!("must be at most {MAX_NODE_BYTES} bytes"));
        }
        if raw.from.0 > raw.to.0 {
            return refuse("to", "must not be earlier than from");
        }
        Ok(Report {
            batch_id: raw.batch_id,
            node: raw.node,
            from_s: raw.from.0,
            to_s: raw.to.0,
            keys: raw.keys.0,
            unattributed: raw.unattributed.0,
            dropped: raw.dropped,
        })
    }
}

/// What a report says besides its counts.
pub(crate) struct Head<'a> {
    pub batch_id: &'a str,
    pub node: &'a str,
    pub from_s: i64,
    pub to_s: i64,
}

/// A report's JSON text ([`Report::to_json`]), its keys in the order `keys` gives them: the
/// reporter writes a tally's as they come, with no map or sort of its own.
pub(crate) fn write_json<'a>(
    head: &Head<'_>,
    keys: impl ExactSizeIterator<Item = (&'a str, &'a KeyUsage)>,
    unattributed: &DenyCounts,
    dropped: u64,
) -> Vec<u8> {
    let mut out = String::with_capacity(160 + head.node.len() * 2 + keys.len() * 110);
    out.push_str("{\"batch_id\":");
    push_string(&mut out, head.batch_id);
    out.push_str(",\"node\":");
    push_string(&mut out, head.node);
    out.push_str(",\"from\":\"");
    out.push_str(&format_rfc3339(head.from_s));
    out.push_str("\",\"to\":\"");
    out.push_str(&format_rfc3339(head.to_s));
    out.push_str("\",\"keys\":{");
    for (i, (id, usage)) in keys.enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_string(&mut out, id);
        out.push_str(":{\"allowed\":");
        out.push_str(&usage.allowed.to_string());
        out.push_str(",\"denied\":");
        push_counts(&mut out, &usage.denied);
        out.push_str(",\"last_used\":\"");
        out.push_str(&format_rfc3339(usage.last_used_s));
        out.push_str("\"}");
    }
    out.push_str("},\"unattributed\":");
    push_counts(&mut out, unattributed);
    out.push_str(",\"dropped\":");
    out.push_str(&dropped.to_string());
    out.push('}');
    out.into_bytes()
}

/// A JSON string: `text` between quotes, with quotes, backslashes and control characters escaped.
fn push_string(out: &mut String, text: &str) {
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 || c == '\u{7f}' => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn push_counts(out: &mut String, counts: &DenyCounts) {
    out.push('{');
    for (i, (kind, n)) in counts.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(kind.name());
        out.push_str("\":");
        out.push_str(&n.to_string());
    }
    out.push('}');
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReport {
    batch_id: String,
    node: String,
    from: Utc,
    to: Utc,
    keys: Keys,
    unattributed: Counts,
    dropped: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyUsage {
    allowed: u64,
    denied: Counts,
    last_used: Utc,
}

/// A time as a report writes it, in Unix seconds.
struct Utc(i64);

impl<'de> Deserialize<'de> for Utc {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl Visitor<'_> for Text {
            type Value = Utc;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an RFC 3339 UTC time")
            }
            // Refused while the reader stands just past the string, so the error names its member.
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Utc, E> {
                parse_utc_seconds(text).map(Utc).map_err(E::custom)
            }
        }
        d.deserialize_str(Text)
    }
}

/// A count for each deny kind named.
struct Counts(DenyCounts);

impl<'de> Deserialize<'de> for Counts {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Kinds;
        impl<'de> Visitor<'de> for Kinds {
            type Value = Counts;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of counts by deny kind")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Counts, A::Error> {
                let mut counts = DenyCounts::default();
                let mut seen = 0u32;
                while let Some(name) = map.next_key::<String>()? {
                    let Some(kind) = DenyKind::ALL.into_iter().find(|k| k.name() == name) else {
                        return Err(de::Error::unknown_field(&name, &KIND_NAMES));
                    };
                    let bit = 1 << kind.index();
                    if seen & bit != 0 {
                        return Err(repeated_name(&name));
                    }
                    seen |= bit;
                    counts.add(kind, map.next_value::<u64>()?);
                }
                Ok(Counts(counts))
            }
        }
        d.deserialize_map(Kinds)
    }
}

/// The `keys` object: each id once, each spelled as a key record's id.
struct Keys(BTreeMap<String, KeyUsage>);

impl<'de> Deserialize<'de> for Keys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Ids;
        impl<'de> Visitor<'de> for Ids {
            type Value = Keys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of usage by key id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = BTreeMap::new();
                while let Some(id) = map.next_key::<String>()? {
                    if !id_is_valid(&id) {
                        return Err(de::Error::custom(format!("key id {id:?} is not non-empty visible ASCII")));
                    }
                    if keys.contains_key(&id) {
                        return Err(repeated_name(&id));
                    }
                    let raw: RawKeyUsage = map.next_value()?;
                    let usage = KeyUsage { allowed: raw.allowed, denied: raw.denied.0, last_used_s: raw.last_used.0 };
                    keys.insert(id, usage);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(Ids)
    }
}
