//! Unit tests of usage reporting's parts, each on its own: the settings, a tally (what it counts,
//! its bound, that a request of a known key allocates nothing), its bytes, the report's JSON and its
//! parser, and the shared-data merge (the reporter as a whole: `reporter_tests.rs`).
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::*;
use crate::error::ErrorKind;
use crate::keys::hash_key;
use crate::live::fake::FakeStore;
use crate::live::store::Store;
use crate::plugin::Plugin;
use crate::policy::RequestView;
use crate::reply::DenyKind;
use serde_json::json;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

fn compile(usage: serde_json::Value) -> Result<UsageConfig, crate::error::ConfigError> {
    let text = json!({ "usage": usage }).to_string();
    Plugin::from_json(text.as_bytes()).map(|p| p.usage.unwrap()).map_err(|e| e.into_first())
}

fn minimal() -> serde_json::Value {
    json!({"cluster": "usage", "authority": "usage.internal", "path": "/v1/usage"})
}

fn with(field: &str, value: serde_json::Value) -> serde_json::Value {
    let mut raw = minimal();
    raw[field] = value;
    raw
}

// ---------------------------------------------------------------------------------------------
// Settings

#[test]
fn usage_settings_have_defaults() {
    let c = compile(minimal()).unwrap();
    assert_eq!((c.cluster.as_str(), c.authority.as_str(), c.path.as_str()), ("usage", "usage.internal", "/v1/usage"));
    assert_eq!((c.flush_interval_ms, c.timeout_ms, c.max_pending_keys), (10_000, 5_000, 10_000));
    assert_eq!(c.tick_ms(), 1_000);
    assert_eq!(c.silence_limit_ms(), 6_000);
    let waits: Vec<u64> = (1..=6).map(|n| c.retry_after_ms(n)).collect();
    assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000]);
    assert_eq!(c.retry_after_ms(u32::MAX), 10_000);
    assert!(c.tally_entry().starts_with("keygate/usage/") && c.tally_entry().ends_with("/tally"));
    let other = compile(with("path", json!("/v2/usage"))).unwrap();
    assert_ne!(other.tally_entry(), c.tally_entry(), "two receivers never share an entry");
    assert!(Plugin::from_json(b"{}").unwrap().usage.is_none(), "no usage block: nothing is counted");
}

#[test]
fn usage_settings_refuse_bad_values_naming_the_field() {
    for (raw, field, reason) in [
        (with("cluster", json!("")), "usage.cluster", "must name an Envoy cluster"),
        (with("authority", json!("a b")), "usage.authority", "must be a host name"),
        (with("path", json!("v1/usage")), "usage.path", "must be a path starting with '/'"),
        (with("flush_interval_ms", json!(999)), "usage.flush_interval_ms", "must be between 1000 and 3600000"),
        (with("flush_interval_ms", json!(3_600_001)), "usage.flush_interval_ms", "must be between 1000 and 3600000"),
        (with("timeout_ms", json!(9)), "usage.timeout_ms", "must be between 10 and 60000"),
        (with("timeout_ms", json!(10_000)), "usage.timeout_ms", "must be less than usage.flush_interval_ms (10000)"),
        (with("max_pending_keys", json!(0)), "usage.max_pending_keys", "must be between 1 and 1000000"),
        (with("max_pending_keys", json!(1_000_001)), "usage.max_pending_keys", "must be between 1 and 1000000"),
    ] {
        let e = compile(raw.clone()).unwrap_err();
        assert_eq!((e.field.as_str(), e.reason(), &e.kind), (field, reason, &ErrorKind::Invalid), "{raw}");
    }
    let c = compile(json!({"cluster": "u", "authority": "u", "path": "/", "flush_interval_ms": 1_000,
                           "timeout_ms": 999, "max_pending_keys": 1}))
    .unwrap();
    assert_eq!((c.flush_interval_ms, c.timeout_ms, c.max_pending_keys, c.tick_ms()), (1_000, 999, 1, 100));
}

#[test]
fn usage_settings_refuse_unknown_missing_and_mistyped_fields() {
    let e = compile(with("colour", json!(1))).unwrap_err();
    assert_eq!(e.field, "usage.colour");
    let ErrorKind::Unknown { allowed } = e.kind else { panic!("{e:?}") };
    assert_eq!(allowed, ["cluster", "authority", "path", "flush_interval_ms", "timeout_ms", "max_pending_keys"]);
    let e = compile(json!({"cluster": "u", "path": "/"})).unwrap_err();
    assert_eq!((e.field.as_str(), e.kind), ("usage", ErrorKind::Missing { name: "authority".into() }));
    let e = compile(with("flush_interval_ms", json!("10s"))).unwrap_err();
    assert_eq!((e.field.as_str(), e.kind), ("usage.flush_interval_ms", ErrorKind::Type));
    let e = Plugin::from_json(br#"{"usage": "on"}"#).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), e.kind), ("usage", ErrorKind::Type));
}

#[test]
fn a_usage_problem_is_reported_with_the_configurations_others() {
    let text = json!({"unmatched": "deny", "credential": {"max_length": 0}, "usage": with("timeout_ms", json!(0))});
    let errors = Plugin::from_json(text.to_string().as_bytes()).unwrap_err();
    let fields: Vec<&str> = errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["credential.max_length", "usage.timeout_ms"]);
}

// ---------------------------------------------------------------------------------------------
// Tally

#[test]
fn a_tally_counts_per_key_and_refusals_without_a_key_as_totals() {
    let mut t = Tally::new(10, 100);
    t.record(Outcome::Allowed { key_id: Some("a") });
    t.set_now(105);
    t.record(Outcome::Allowed { key_id: Some("a") });
    t.record(Outcome::Denied { kind: DenyKind::InsufficientScope, key_id: Some("a") });
    t.record(Outcome::Denied { kind: DenyKind::ExpiredKey, key_id: Some("b") });
    t.record(Outcome::Denied { kind: DenyKind::InvalidKey, key_id: None });
    t.record(Outcome::Denied { kind: DenyKind::InvalidKey, key_id: Some("made-up") });
    t.record(Outcome::Denied { kind: DenyKind::Forbidden, key_id: None });
    t.record(Outcome::Allowed { key_id: None });
    assert_eq!(t.len(), 2);
    let a = t.get("a").unwrap();
    assert_eq!((a.allowed, a.denied.get(DenyKind::InsufficientScope), a.last_used_s), (2, 1, 105));
    assert_eq!(t.get("b").unwrap().denied.iter().collect::<Vec<_>>(), [(DenyKind::ExpiredKey, 1)]);
    assert_eq!(t.unattributed().iter().collect::<Vec<_>>(), [(DenyKind::InvalidKey, 2), (DenyKind::Forbidden, 1)]);
    assert_eq!((t.dropped(), t.requests()), (0, 7));
    let taken = t.take();
    assert!(t.is_empty() && !taken.is_empty());
    assert_eq!((t.max_keys(), t.now_s()), (10, 105));
}

#[test]
fn only_found_keys_are_attributed() {
    let kinds: Vec<DenyKind> = DenyKind::ALL.into_iter().filter(|k| attributable(*k)).collect();
    assert_eq!(kinds, [DenyKind::RevokedKey, DenyKind::ExpiredKey, DenyKind::InsufficientScope, DenyKind::Forbidden]);
}

#[test]
fn a_tally_keeps_at_most_its_bound_and_counts_the_rest_as_dropped() {
    let mut t = Tally::new(2, 0);
    for id in ["a", "b", "c", "c", "a", "d"] {
        t.record(Outcome::Allowed { key_id: Some(id) });
    }
    assert_eq!((t.len(), t.dropped(), t.get("a").unwrap().allowed), (2, 3, 2));
    let mut other = Tally::new(5, 0);
    for id in ["a", "x", "y"] {
        other.record(Outcome::Denied { kind: DenyKind::RevokedKey, key_id: Some(id) });
    }
    other.record(Outcome::Allowed { key_id: Some("y") });
    other.record(Outcome::Denied { kind: DenyKind::MissingKey, key_id: None });
    t.merge(other);
    assert_eq!(t.len(), 2, "a merge keeps the bound");
    assert_eq!(t.get("a").unwrap().denied.get(DenyKind::RevokedKey), 1);
    assert_eq!(t.dropped(), 3 + 3, "x's one request and y's two");
    assert_eq!(t.requests(), 6 + 5);
    assert_eq!(Tally::new(0, 0).max_keys(), 1);
}

#[test]
fn merging_keeps_the_latest_last_use() {
    let mut a = Tally::new(4, 50);
    a.record(Outcome::Allowed { key_id: Some("k") });
    let mut b = Tally::new(4, 70);
    b.record(Outcome::Allowed { key_id: Some("k") });
    let mut c = Tally::new(4, 60);
    c.record(Outcome::Allowed { key_id: Some("k") });
    a.merge(b);
    a.merge(c);
    assert_eq!(*a.get("k").unwrap(), KeyUsage { allowed: 3, denied: DenyCounts::default(), last_used_s: 70 });
}

#[test]
fn outcome_of_a_decision_carries_the_key_id_only_when_the_key_was_found() {
    let hash = |k: &str| hex::encode(hash_key(k.as_bytes()));
    let config = json!({"keys": [{"id": "k1", "hash": hash("sk_1"), "org": "o", "scopes": ["a"]},
                                 {"id": "k2", "hash": hash("sk_2"), "org": "o", "revoked": true}],
                        "routes": [{"path": "/open", "public": true}, {"path": "/a", "scopes": ["a"]},
                                   {"path": "/b", "scopes": ["b"]}]});
    let policy = Plugin::from_json(config.to_string().as_bytes()).unwrap().policy;
    let mut t = Tally::new(10, 0);
    for (path, key) in [
        ("/a", Some("sk_1")),
        ("/b", Some("sk_1")),
        ("/a", Some("sk_2")),
        ("/a", Some("sk_9")),
        ("/a", None),
        ("/open", None),
    ] {
        let mut h = vec![(":method".to_string(), b"GET".to_vec()), (":path".to_string(), path.as_bytes().to_vec())];
        if let Some(key) = key {
            h.push(("authorization".to_string(), format!("Bearer {key}").into_bytes()));
        }
        let decision = policy.decide(&policy.keys, &RequestView::from_headers(&h), &|| Some(0));
        t.record(Outcome::of(&decision));
    }
    let k1 = t.get("k1").unwrap();
    assert_eq!((k1.allowed, k1.denied.get(DenyKind::InsufficientScope)), (1, 1));
    assert_eq!(t.get("k2").unwrap().denied.get(DenyKind::RevokedKey), 1);
    assert_eq!(t.len(), 2);
    assert_eq!(t.unattributed().iter().collect::<Vec<_>>(), [(DenyKind::MissingKey, 1), (DenyKind::InvalidKey, 1)]);
}

/// Counts the allocations of the thread that asks, so that tests running at once do not mix.
struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the counter is a const
// thread-local `Cell` with no destructor, which allocates nothing.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: the caller's `layout`, passed on unchanged, under GlobalAlloc's own contract.
        unsafe { System.alloc(layout) }
    }

    // SAFETY: `ptr` came from `alloc`/`realloc` above, that is from `System`, with this `layout`.
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above: `System`'s own pointer and layout, passed back unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    // SAFETY: `ptr` came from `System` with `layout`; `new_size` is the caller's, under GlobalAlloc's
    // contract.
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        // SAFETY: as above: `System`'s own pointer and layout, and the caller's new size.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn allocations_of(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

#[test]
fn recording_a_key_already_counted_allocates_nothing() {
    let mut t = Tally::new(2, 0);
    let ids: Vec<String> = ["k1", "k2", "k3"].iter().map(|s| s.to_string()).collect();
    assert!(allocations_of(|| t.record(Outcome::Allowed { key_id: Some(&ids[0]) })) > 0, "a new entry");
    t.record(Outcome::Allowed { key_id: Some(&ids[1]) });
    let n = allocations_of(|| {
        for _ in 0..1_000 {
            t.record(Outcome::Allowed { key_id: Some(&ids[0]) });
            t.record(Outcome::Denied { kind: DenyKind::Forbidden, key_id: Some(&ids[1]) });
            t.record(Outcome::Allowed { key_id: Some(&ids[2]) }); // past the bound: dropped
            t.record(Outcome::Denied { kind: DenyKind::InvalidKey, key_id: None });
        }
    });
    assert_eq!(n, 0);
    assert_eq!((t.get("k1").unwrap().allowed, t.dropped()), (1_001, 1_000));
}

// ---------------------------------------------------------------------------------------------
// A tally's bytes

fn sample() -> Tally {
    let mut t = Tally::new(100, 1_796_306_409);
    t.record(Outcome::Allowed { key_id: Some("ab12cd34") });
    t.record(Outcome::Denied { kind: DenyKind::InsufficientScope, key_id: Some("ab12cd34") });
    t.record(Outcome::Denied { kind: DenyKind::RevokedKey, key_id: Some("old\"one\\") });
    for _ in 0..300 {
        t.record(Outcome::Denied { kind: DenyKind::MissingKey, key_id: None });
    }
    t.add_dropped(u64::MAX - 1);
    t
}

#[test]
fn a_tally_comes_back_from_its_bytes() {
    let t = sample();
    let bytes = encode(&t);
    assert_eq!(&bytes[..2], b"U\x01");
    assert_eq!(decode(&bytes, 100, 1_796_306_409).unwrap(), t);
    assert_eq!(decode(&encode(&Tally::new(5, 0)), 5, 0).unwrap(), Tally::new(5, 0));
    assert_eq!(decode(b"", 5, 9).unwrap(), Tally::new(5, 9), "an emptied entry");
    // Read with a smaller bound, the entries past it are dropped requests.
    let small = decode(&bytes, 1, 0).unwrap();
    assert_eq!((small.len(), small.dropped()), (1, u64::MAX), "saturated");
    assert_eq!(small.unattributed().get(DenyKind::MissingKey), 300);
}

#[test]
fn bytes_that_are_no_tally_are_refused_with_where_and_why() {
    let good = encode(&sample());
    let mut trailing = good.clone();
    trailing.push(0);
    let one_entry = |id: &[u8]| {
        let mut b = vec![b'U', 1, 0, 0, 1, id.len() as u8];
        b.extend_from_slice(id);
        b.extend_from_slice(&[1, 0, 0]);
        b
    };
    let mut twice = vec![b'U', 1, 0, 0, 2];
    twice.extend_from_slice(&[1, b'k', 1, 0, 0, 1, b'k', 1, 0, 0]);
    for (bytes, at, reason) in [
        (b"X\x01".to_vec(), 2, "not a keygate usage tally (version 1)"),
        (b"U\x02".to_vec(), 2, "not a keygate usage tally (version 1)"),
        (b"U".to_vec(), 0, "truncated"),
        (good[..good.len() - 1].to_vec(), good.len() - 1, "truncated"),
        (trailing, good.len(), "bytes after the last entry"),
        (vec![b'U', 1, 0x80, 0x00], 4, "a number not in its shortest form"),
        (vec![b'U', 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02], 12, "a number past 64 bits"),
        (vec![b'U', 1, 0, 0x80, 0x01], 5, "an unknown deny kind"),
        (vec![b'U', 1, 0, 1, 0], 5, "a count of zero"),
        (one_entry(b""), 6, "a key id that is not visible ASCII"),
        (one_entry(b"a b"), 9, "a key id that is not visible ASCII"),
        (one_entry("é".as_bytes()), 8, "a key id that is not visible ASCII"),
        (twice, 15, "a key id listed twice"),
        (vec![b'U', 1, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f], 9, "truncated"),
    ] {
        let e = decode(&bytes, 10, 0).unwrap_err();
        assert_eq!((e.at, e.reason), (at, reason), "{bytes:?}");
    }
    assert_eq!(decode(b"U", 1, 0).unwrap_err().to_string(), "usage tally: truncated at byte 0");
}

// ---------------------------------------------------------------------------------------------
// The report

fn report() -> Report {
    let mut t = Tally::new(10, 1_796_306_409);
    for _ in 0..12 {
        t.record(Outcome::Allowed { key_id: Some("ab12cd34") });
    }
    t.record(Outcome::Denied { kind: DenyKind::InsufficientScope, key_id: Some("ab12cd34") });
    t.set_now(1_796_306_402);
    t.record(Outcome::Denied { kind: DenyKind::ExpiredKey, key_id: Some("9z") });
    for kind in [DenyKind::MissingKey, DenyKind::InvalidKey] {
        for _ in 0..(if kind == DenyKind::MissingKey { 3 } else { 5 }) {
            t.record(Outcome::Denied { kind, key_id: None });
        }
    }
    Report::new(batch_id("node-1", 1_796_306_399_750, 2, 3), "node-1", 1_796_306_400, 1_796_306_410, t)
}

const REPORT: &str = concat!(
    r#"{"batch_id":"node-1/1796306399750-2/3","node":"node-1","from":"2026-12-03T14:00:00Z","to":"2026-12-03T14:00:10Z","#,
    r#""keys":{"9z":{"allowed":0,"denied":{"expired_key":1},"last_used":"2026-12-03T14:00:02Z"},"#,
    r#""ab12cd34":{"allowed":12,"denied":{"insufficient_scope":1},"last_used":"2026-12-03T14:00:09Z"}},"#,
    r#""unattributed":{"missing_key":3,"invalid_key":5},"dropped":0}"#
);

#[test]
fn a_report_is_written_in_the_documented_shape() {
    let r = report();
    assert_eq!(String::from_utf8(r.to_json()).unwrap(), REPORT);
    assert_eq!(r.requests(), 12 + 1 + 1 + 3 + 5);
    let value: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
    assert_eq!(value["keys"]["ab12cd34"]["denied"], json!({"insufficient_scope": 1}));
}

#[test]
fn a_report_reads_back_as_written() {
    let r = report();
    assert_eq!(Report::parse(&r.to_json()).unwrap(), r);
    let pretty = serde_json::to_string_pretty(&serde_json::from_slice::<serde_json::Value>(&r.to_json()).unwrap());
    assert_eq!(Report::parse(pretty.unwrap().as_bytes()).unwrap(), r, "whitespace is not the writer's alone");
    // Any node text, and ids with quotes and backslashes, are escaped and read back.
    let mut t = Tally::new(3, 0);
    t.record(Outcome::Allowed { key_id: Some(r#"a"b\c"#) });
    let odd = Report::new("b/1/1".into(), "nöde \"1\"\n\u{1}", 0, 0, t);
    assert_eq!(Report::parse(&odd.to_json()).unwrap(), odd);
    // A zero count someone else wrote is as good as none.
    let zero = REPORT.replace(r#""missing_key":3,"#, r#""missing_key":0,"revoked_key":0,"#);
    let read = Report::parse(zero.as_bytes()).unwrap();
    assert_eq!(read.unattributed.iter().collect::<Vec<_>>(), [(DenyKind::InvalidKey, 5)]);
}

#[test]
fn the_kind_names_are_the_stats_names() {
    assert_eq!(KIND_NAMES.to_vec(), DenyKind::ALL.map(DenyKind::name).to_vec());
}

#[test]
fn a_malformed_report_is_refused_naming_the_member() {
    let edit = |from: &str, to: &str| {
        assert!(REPORT.contains(from), "{from}");
        REPORT.replacen(from, to, 1)
    };
    for (text, field, kind) in [
        (
            edit(r#""dropped":0"#, r#""dropped":0,"extra":1"#),
            "extra",
            ErrorKind::Unknown { allowed: &["batch_id", "node", "from", "to", "keys", "unattributed", "dropped"] },
        ),
        (edit(r#","dropped":0"#, ""), "", ErrorKind::Missing { name: "dropped".into() }),
        (edit(r#""dropped":0"#, r#""dropped":-1"#), "dropped", ErrorKind::Invalid),
        (edit(r#""dropped":0"#, r#""dropped":"0""#), "dropped", ErrorKind::Type),
        (
            edit(r#""missing_key":3"#, r#""teapot":3"#),
            "unattributed.teapot",
            ErrorKind::Unknown { allowed: &KIND_NAMES },
        ),
        (
            edit(r#""missing_key":3"#, r#""missing_key":3,"missing_key":1"#),
            "unattributed.missing_key",
            ErrorKind::Duplicate { of: "unattributed.missing_key".into() },
        ),
        (edit(r#""9z":{"#, r#""ab12cd34":{"#), "keys.ab12cd34", ErrorKind::Duplicate { of: "keys.ab12cd34".into() }),
        (edit(r#""9z":{"#, r#""9 z":{"#), "keys.9 z", ErrorKind::Invalid),
        (edit(r#""9z":{"#, r#""":{"#), "keys.", ErrorKind::Invalid),
        (edit(r#""allowed":0,"#, ""), "keys.9z", ErrorKind::Missing { name: "allowed".into() }),
        (edit("2026-12-03T14:00:02Z", "2026-12-03T14:00:02.5Z"), "keys.9z.last_used", ErrorKind::Invalid),
        (edit("2026-12-03T14:00:00Z", "2026-12-03T15:00:00+01:00"), "from", ErrorKind::Invalid),
        (edit("2026-12-03T14:00:00Z", "yesterday"), "from", ErrorKind::Invalid),
        (edit("2026-12-03T14:00:10Z", "2026-12-03T13:59:59Z"), "to", ErrorKind::Invalid),
        (edit(r#""node-1/1796306399750-2/3""#, r#""""#), "batch_id", ErrorKind::Invalid),
        (edit(r#""node":"node-1""#, r#""node":null"#), "node", ErrorKind::Type),
        (REPORT[..REPORT.len() - 1].to_string(), "", ErrorKind::Syntax),
        (format!("{REPORT} {{}}"), "", ErrorKind::Syntax),
        ("[]".to_string(), "", ErrorKind::Type),
        ("  ".to_string(), "", ErrorKind::Syntax),
    ] {
        match Report::parse(text.as_bytes()) {
            Err(ReportError::Invalid(e)) => {
                assert!(e.field == field && e.kind == kind, "{text}: {e:?}");
                assert!(!e.reason().is_empty());
            }
            other => panic!("{text}: {other:?}"),
        }
    }
    let e = Report::parse(edit("2026-12-03T14:00:00Z", "yesterday").as_bytes()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "usage report: from: expected an RFC 3339 UTC time to the second such as 2027-01-01T00:00:00Z, got \
         \"yesterday\" at line 1 column 73"
    );
    let long_node = edit(r#""node":"node-1""#, &format!(r#""node":"{}""#, "n".repeat(MAX_NODE_BYTES + 1)));
    assert!(matches!(Report::parse(long_node.as_bytes()), Err(ReportError::Invalid(e)) if e.field == "node"));
}

#[test]
fn an_oversized_report_is_refused_unread() {
    let limits = ReportLimits { max_bytes: REPORT.len() - 1, max_keys: 10 };
    let e = Report::parse_within(REPORT.as_bytes(), &limits).unwrap_err();
    assert_eq!(e, ReportError::TooLarge { bytes: REPORT.len(), limit: REPORT.len() - 1 });
    assert_eq!(
        e.to_string(),
        format!("usage report: {} bytes, more than the limit ({})", REPORT.len(), REPORT.len() - 1)
    );
    // Past the limit, even bytes that are not JSON at all are refused for their size.
    let huge = vec![b'x'; (64 << 20) + 1];
    let start = std::time::Instant::now();
    assert!(matches!(Report::parse(&huge), Err(ReportError::TooLarge { .. })));
    assert!(start.elapsed() < std::time::Duration::from_millis(100));
    let e = Report::parse_within(REPORT.as_bytes(), &ReportLimits { max_bytes: 1 << 20, max_keys: 1 }).unwrap_err();
    assert_eq!(e, ReportError::TooManyKeys { keys: 2, limit: 1 });
    assert_eq!(e.to_string(), "usage report: 2 keys, more than the limit (1)");
}

// ---------------------------------------------------------------------------------------------
// Shared data

#[test]
fn workers_deposit_in_shared_data_and_the_reporter_collects_it_all_once() {
    let store = FakeStore::default();
    let entry = "keygate/usage/test/tally";
    shared::prepare(&store, entry).unwrap();
    shared::prepare(&store, entry).unwrap();
    let mut expected = Tally::new(10, 0);
    for w in 0..4 {
        let mut t = Tally::new(10, 100 + w);
        t.record(Outcome::Allowed { key_id: Some("shared") });
        t.record(Outcome::Allowed { key_id: Some(&format!("w{w}")) });
        t.record(Outcome::Denied { kind: DenyKind::MissingKey, key_id: None });
        assert_eq!(shared::deposit(&store, entry, &t).unwrap(), None);
        expected.merge(t);
    }
    let got = shared::collect(&store, entry, 10, 0).unwrap();
    assert_eq!(got, expected);
    assert_eq!(got.get("shared").unwrap().last_used_s, 103);
    assert_eq!(store.value(entry), Some(Vec::new()), "collected: empty");
    assert!(shared::collect(&store, entry, 10, 0).unwrap().is_empty(), "nothing is collected twice");
    assert!(shared::collect(&store, "absent", 10, 0).unwrap().is_empty());
}

#[test]
fn a_deposit_racing_another_write_retries_and_unreadable_bytes_are_replaced() {
    /// A store where another worker writes the entry between each of the first reads and writes.
    struct Racing<'a> {
        inner: &'a FakeStore,
        races: Cell<usize>,
    }
    impl Store for Racing<'_> {
        fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, crate::live::StoreError> {
            let got = self.inner.get(entry);
            if self.races.get() > 0 {
                self.races.set(self.races.get() - 1);
                let mut other = Tally::new(10, 0);
                other.record(Outcome::Allowed { key_id: Some("other") });
                let current = self.inner.get(entry).unwrap().map(|(v, _)| v).unwrap_or_default();
                let mut merged = decode(&current, 10, 0).unwrap();
                merged.merge(other);
                self.inner.set(entry, &encode(&merged), None).unwrap();
            }
            got
        }
        fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, crate::live::StoreError> {
            self.inner.set(entry, value, cas)
        }
    }
    let inner = FakeStore::default();
    let entry = "e";
    shared::prepare(&inner, entry).unwrap();
    let store = Racing { inner: &inner, races: Cell::new(3) };
    let mut mine = Tally::new(10, 0);
    mine.record(Outcome::Allowed { key_id: Some("mine") });
    shared::deposit(&store, entry, &mine).unwrap();
    let got = shared::collect(&inner, entry, 10, 0).unwrap();
    assert_eq!((got.get("other").unwrap().allowed, got.get("mine").unwrap().allowed), (3, 1));

    let always = Racing { inner: &inner, races: Cell::new(usize::MAX) };
    assert_eq!(shared::deposit(&always, entry, &mine).unwrap_err(), "e: no compare-and-swap succeeded in 100 tries");

    inner.set(entry, b"junk", None).unwrap();
    let unreadable = shared::deposit(&inner, entry, &mine).unwrap();
    assert_eq!(unreadable.map(|e| e.reason), Some("not a keygate usage tally (version 1)"));
    assert_eq!(shared::collect(&inner, entry, 10, 0).unwrap(), mine);
    inner.set(entry, b"junk", None).unwrap();
    assert!(shared::collect(&inner, entry, 10, 0).unwrap().is_empty());
    assert_eq!(inner.value(entry), Some(Vec::new()));
}
