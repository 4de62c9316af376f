//! Property tests of usage counting and its formats: whatever the outcomes, the workers and the
//! bound, every request counted is reported once, under its key or as a total or as dropped; a
//! tally and a report read back as written; arbitrary or damaged bytes are refused, never a panic;
//! and a receiver failing at random gets every count once it recovers, each batch id on one body.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::{Envoy, Fault};
use super::*;
use crate::reply::DenyKind;
use proptest::prelude::*;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};

/// One recorded outcome: a key (of a small pool, so keys repeat), or none, and a kind, or none
/// (allowed).
fn outcome() -> impl Strategy<Value = (Option<u8>, Option<usize>)> {
    (prop::option::weighted(0.8, 0..12u8), prop::option::weighted(0.5, 0..DenyKind::ALL.len()))
}

fn id(n: u8) -> String {
    format!("key-{n}")
}

fn as_outcome(key: &Option<String>, kind: Option<usize>) -> Outcome<'_> {
    match kind {
        None => Outcome::Allowed { key_id: key.as_deref() },
        Some(k) => Outcome::Denied { kind: DenyKind::ALL[k], key_id: key.as_deref() },
    }
}

/// A tally of random outcomes, its clock moving.
fn tally() -> impl Strategy<Value = Tally> {
    (1..8usize, prop::collection::vec((outcome(), 0..5i64), 0..60)).prop_map(|(bound, steps)| {
        let mut t = Tally::new(bound, 1_796_306_400);
        for ((key, kind), dt) in steps {
            t.set_now(t.now_s() + dt);
            let key = key.map(id);
            t.record(as_outcome(&key, kind));
        }
        t
    })
}

/// Damage to a valid encoding or report.
#[derive(Debug, Clone)]
enum Damage {
    Flip(usize, u8),
    Cut(usize),
    Insert(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Damage::Flip(at, b)),
        any::<usize>().prop_map(Damage::Cut),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Damage::Insert(at, b)),
    ]
}

fn damaged(mut bytes: Vec<u8>, damage: &[Damage]) -> Vec<u8> {
    for d in damage {
        let len = bytes.len().max(1);
        match *d {
            Damage::Flip(at, b) if !bytes.is_empty() => bytes[at % len] ^= b,
            Damage::Cut(at) => bytes.truncate(at % len),
            Damage::Insert(at, b) => bytes.insert(at % (bytes.len() + 1), b),
            Damage::Flip(..) => {}
        }
    }
    bytes
}

#[derive(Debug, Clone)]
enum Op {
    Traffic(usize, Vec<(Option<u8>, Option<usize>)>),
    Fault(Option<usize>),
    Run(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0..3usize, prop::collection::vec(outcome(), 0..20)).prop_map(|(w, o)| Op::Traffic(w, o)),
        2 => prop::option::weighted(0.7, 0..6usize).prop_map(Op::Fault),
        3 => (10..25_000i64).prop_map(Op::Run),
    ]
}

fn fault(kind: usize) -> Fault {
    match kind {
        0 => Fault::Status(503),
        1 => Fault::Down,
        2 => Fault::Slow(4_000),
        3 => Fault::Lost,
        4 => Fault::Garbage,
        _ => Fault::Refuse,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn merged_tallies_count_every_request_once_within_the_bound(
        workers in prop::collection::vec(prop::collection::vec(outcome(), 0..80), 1..5),
        bound in 1..16usize,
    ) {
        let mut by_key: BTreeMap<String, u64> = BTreeMap::new();
        let mut unattributed = DenyCounts::default();
        let mut total = 0u64;
        let mut merged = Tally::new(bound, 0);
        for outcomes in &workers {
            let mut t = Tally::new(bound, 0);
            for (key, kind) in outcomes {
                let key = key.map(id);
                t.record(as_outcome(&key, *kind));
                match (&key, kind.map(|k| DenyKind::ALL[k])) {
                    (None, None) => continue,
                    (Some(k), None) => *by_key.entry(k.clone()).or_default() += 1,
                    (Some(k), Some(kind)) if attributable(kind) => *by_key.entry(k.clone()).or_default() += 1,
                    (_, Some(kind)) => unattributed.add(kind, 1),
                }
                total += 1;
            }
            prop_assert!(t.len() <= bound);
            merged.merge(t);
        }
        prop_assert!(merged.len() <= bound);
        prop_assert_eq!(merged.requests(), total);
        prop_assert_eq!(merged.unattributed(), &unattributed);
        for (id, usage) in merged.keys() {
            prop_assert!(usage.requests() <= by_key[id], "{} counted more than recorded", id);
        }
        if by_key.len() <= bound {
            prop_assert_eq!(merged.dropped(), 0);
            let got: BTreeMap<String, u64> = merged.keys().map(|(id, u)| (id.to_string(), u.requests())).collect();
            prop_assert_eq!(got, by_key);
        }
    }

    #[test]
    fn a_tally_reads_back_from_its_bytes(t in tally()) {
        let back = decode(&encode(&t), t.max_keys(), t.now_s()).unwrap();
        prop_assert_eq!(back, t);
    }

    #[test]
    fn any_bytes_decode_or_are_refused_within_the_bound(bytes in prop::collection::vec(any::<u8>(), 0..200), bound in 1..4usize) {
        let mut with_tag = vec![b'U', 1];
        with_tag.extend_from_slice(&bytes);
        for input in [&bytes, &with_tag] {
            if let Ok(t) = decode(input, bound, 0) {
                prop_assert!(t.len() <= bound);
                prop_assert_eq!(decode(&encode(&t), bound, 0).unwrap(), t);
            }
        }
    }

    #[test]
    fn damaged_bytes_never_panic(t in tally(), damage in prop::collection::vec(damage(), 1..4)) {
        let bytes = damaged(encode(&t), &damage);
        if let Ok(back) = decode(&bytes, t.max_keys(), 0) {
            prop_assert!(back.len() <= t.max_keys());
        }
    }

    #[test]
    fn a_report_reads_back_as_written(
        t in tally(),
        node in "\\PC{0,12}",
        ids in prop::collection::vec("[!-~]{1,8}", 0..6),
        span in 0..100_000i64,
    ) {
        let mut t = t;
        for id in &ids {
            t.record(Outcome::Denied { kind: DenyKind::Forbidden, key_id: Some(id) });
        }
        let report = Report::new(batch_id(&node, 7, 0, 1), &node, 1_796_306_400, 1_796_306_400 + span, t);
        prop_assert_eq!(Report::parse(&report.to_json()).unwrap(), report);
    }

    #[test]
    fn any_text_or_damaged_report_is_parsed_or_refused_never_a_panic(
        t in tally(),
        damage in prop::collection::vec(damage(), 1..4),
        junk in prop::collection::vec(any::<u8>(), 0..300),
    ) {
        let report = Report::new("n/1/1".into(), "n", 0, 10, t);
        let limits = ReportLimits { max_bytes: 1 << 16, max_keys: 4 };
        for text in [damaged(report.to_json(), &damage), junk] {
            match Report::parse_within(&text, &limits) {
                Ok(r) => {
                    prop_assert!(r.keys.len() <= 4 && r.from_s <= r.to_s);
                    prop_assert_eq!(Report::parse(&r.to_json()).unwrap(), r);
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn whatever_the_receiver_does_every_count_arrives_once_it_recovers(ops in prop::collection::vec(op(), 1..20)) {
        let mut e = Envoy::new(3, json!({}));
        for op in &ops {
            match op {
                Op::Traffic(w, outcomes) => {
                    for (key, kind) in outcomes {
                        let key = key.map(id);
                        e.record(*w, as_outcome(&key, *kind));
                    }
                }
                Op::Fault(kind) => e.fault(kind.map(fault)),
                Op::Run(ms) => e.run_ms(*ms),
            }
            let stats = e.reporter.stats();
            prop_assert!(stats.keys_pending <= 2 * 10_000);
        }
        e.fault(None);
        prop_assert!(e.run_until_delivered(60_000).is_some(), "not delivered a minute after recovery: {:?}", ops);
        prop_assert_eq!(e.received(), e.recorded.clone());
        // A batch id always carries the same body; no two reports overlap in time.
        let mut bodies: HashMap<String, Vec<u8>> = HashMap::new();
        for post in e.posts() {
            let id = post.report().batch_id;
            let body = bodies.entry(id.clone()).or_insert_with(|| post.body.clone());
            prop_assert!(*body == post.body, "batch {} sent with two bodies", id);
        }
        let taken = e.taken();
        for pair in taken.windows(2) {
            prop_assert_eq!(pair[0].to_s, pair[1].from_s);
        }
        let stats = e.reporter.stats();
        prop_assert_eq!(stats.reports_sent, taken.len() as u64);
        prop_assert_eq!(stats.keys_pending, 0);
    }
}
