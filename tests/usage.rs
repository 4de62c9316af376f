//! Usage reporting (README "`usage`: what each key did") in a real Envoy: the counts a receiver
//! gets equal the requests sent, per key and per deny kind, with four workers; one POST per flush
//! interval per Envoy; a receiver that is down, slow, failing or answering garbage changes no reply
//! and no latency, and gets every count once it recovers, each report under the batch id it was
//! first sent with; a report refused for good is dropped and counted; keys past
//! `max_pending_keys` are counted as dropped; an ECDS update hands the counts not yet sent to the
//! new configuration; a configuration without `usage` sends nothing.
//!
//! The happy path posts to the real `keygate serve`; the faults are played by the tests' key-set
//! server (tests/common/keyset.rs), which records every POST with its body. Every test runs on the
//! host under test (the wasm filter, then the native module).
//!
//! Settings: `flush_interval_ms` 1 000 (a 100 ms tick), `timeout_ms` 500, so a report goes every
//! second and a retry after 1 s. Bounds are generous (a shared 2-core machine runs these) but each
//! one can fail.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::envoy::Host;
use common::serve::KeygateServe;
use common::{send, Envoy, EnvoyOptions, Fault, KeySetRequest, KeySetServer, Proto, Upstream};
use keygate_core::keys::hash_key;
use keygate_core::usage::Report;
use serde_json::{json, Value};

const READER: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const WRITER: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";
const REVOKED: &str = "sk_live_0000cccc_3333333333333333333333333333333333333333333333333333333333333333";
const EXPIRED: &str = "sk_live_0000dddd_4444444444444444444444444444444444444444444444444444444444444444";
const UNKNOWN: &str = "sk_live_0000aaaa_9999999999999999999999999999999999999999999999999999999999999999";

/// The Envoy node id the reports name.
const NODE: &str = "usage-test-node";
const USAGE_PATH: &str = "/usage";
const FLUSH_MS: u64 = 1_000;
/// Longer than any reply may take, the receiver's faults notwithstanding.
const SLOWEST_REPLY: Duration = Duration::from_millis(1_000);

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

/// The `usage` block, with `extra` settings over the tests' defaults.
fn usage(extra: Value) -> Value {
    let mut usage = json!({"cluster": common::USAGE_CLUSTER, "authority": "usage.internal", "path": USAGE_PATH,
                           "flush_interval_ms": FLUSH_MS, "timeout_ms": 500});
    for (k, v) in extra.as_object().unwrap() {
        usage[k] = v.clone();
    }
    usage
}

/// The plugin configuration: four keys (a reader and a writer bound to venue v_1, a revoked and
/// an expired one), `extra` keys more, and `usage` when given.
fn plugin(usage: Option<Value>, extra_keys: &[(&str, &str)]) -> String {
    let mut keys = vec![
        json!({"id": "0000aaaa", "hash": hash(READER), "org": "org_1", "scopes": ["things:read"], "attributes": {"venue": "v_1"}}),
        json!({"id": "0000bbbb", "hash": hash(WRITER), "org": "org_1", "scopes": ["things:read", "things:write"],
               "attributes": {"venue": "v_1"}}),
        json!({"id": "0000cccc", "hash": hash(REVOKED), "org": "org_1", "scopes": ["things:read"], "revoked": true}),
        json!({"id": "0000dddd", "hash": hash(EXPIRED), "org": "org_1", "scopes": ["things:read"],
               "expires_at": "2020-01-01T00:00:00Z"}),
    ];
    for (id, key) in extra_keys {
        keys.push(json!({"id": id, "hash": hash(key), "org": "org_2", "scopes": ["things:read"], "attributes": {"venue": "v_1"}}));
    }
    let mut config = json!({
        "credential": {"headers": ["authorization"], "prefixes": ["sk_live_"]},
        "keys": keys,
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/**", "scopes": ["things:read"], "bind": {"venue_id": "venue"}},
            {"methods": ["POST"], "path": "/v1/venues/{venue_id}/**", "scopes": ["things:write"], "bind": {"venue_id": "venue"}}
        ],
        "unmatched": "deny"
    });
    if let Some(usage) = usage {
        config["usage"] = usage;
    }
    config.to_string()
}

/// Envoy with `plugin`, node id [`NODE`], the `usage` cluster at `usage_port`.
fn envoy(plugin: &str, upstream: &Upstream, usage_port: u16, concurrency: u32) -> Envoy {
    let mut opts = EnvoyOptions::new(Some(plugin), upstream.port());
    opts.usage_port = Some(usage_port);
    opts.concurrency = concurrency;
    let mut bootstrap = opts.bootstrap();
    bootstrap["node"] = json!({"id": NODE, "cluster": "usage-tests"});
    Envoy::try_start_bootstrap(&bootstrap, concurrency).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
}

// ---------------------------------------------------------------------------------------------
// Traffic and what it should count

/// One kind of request, and what usage reporting counts for it.
#[derive(Clone, Copy, Debug)]
struct Shot {
    method: &'static str,
    path: &'static str,
    key: Option<&'static str>,
    /// `Some((key id, None))`: allowed; `Some((id, Some(kind)))`: refused with the key found;
    /// `None` with `kind`: a refusal with no key id; neither: not counted (a public route).
    id: Option<&'static str>,
    kind: Option<&'static str>,
}

const fn shot(
    method: &'static str,
    path: &'static str,
    key: Option<&'static str>,
    id: Option<&'static str>,
    kind: Option<&'static str>,
) -> Shot {
    Shot { method, path, key, id, kind }
}

/// A round of traffic: (shot, how many).
const ROUND: [(Shot, u64); 9] = [
    (shot("GET", "/v1/venues/v_1/things", Some(READER), Some("0000aaaa"), None), 3),
    (shot("POST", "/v1/venues/v_1/things", Some(WRITER), Some("0000bbbb"), None), 2),
    (shot("POST", "/v1/venues/v_1/things", Some(READER), Some("0000aaaa"), Some("insufficient_scope")), 1),
    (shot("GET", "/v1/venues/v_2/things", Some(READER), Some("0000aaaa"), Some("forbidden")), 1),
    (shot("GET", "/v1/venues/v_1/things", Some(REVOKED), Some("0000cccc"), Some("revoked_key")), 1),
    (shot("GET", "/v1/venues/v_1/things", Some(EXPIRED), Some("0000dddd"), Some("expired_key")), 1),
    (shot("GET", "/v1/venues/v_1/things", None, None, Some("missing_key")), 2),
    (shot("GET", "/v1/venues/v_1/things", Some(UNKNOWN), None, Some("invalid_key")), 2),
    (shot("GET", "/healthz", None, None, None), 1),
];

/// What reports add up to: by key id, allowed and denied by kind; refusals with no key id by
/// kind; dropped requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Totals {
    keys: BTreeMap<String, (u64, BTreeMap<String, u64>)>,
    unattributed: BTreeMap<String, u64>,
    dropped: u64,
}

impl Totals {
    fn count(&mut self, shot: &Shot, n: u64) {
        match (shot.id, shot.kind) {
            (Some(id), None) => self.keys.entry(id.into()).or_default().0 += n,
            (Some(id), Some(kind)) => *self.keys.entry(id.into()).or_default().1.entry(kind.into()).or_default() += n,
            (None, Some(kind)) => *self.unattributed.entry(kind.into()).or_default() += n,
            (None, None) => {}
        }
    }

    fn add(&mut self, report: &Report) {
        for (id, usage) in &report.keys {
            let entry = self.keys.entry(id.clone()).or_default();
            entry.0 += usage.allowed;
            for (kind, n) in usage.denied.iter() {
                *entry.1.entry(kind.name().into()).or_default() += n;
            }
        }
        for (kind, n) in report.unattributed.iter() {
            *self.unattributed.entry(kind.name().into()).or_default() += n;
        }
        self.dropped += report.dropped;
    }

    fn of(reports: &[Report]) -> Totals {
        let mut totals = Totals::default();
        reports.iter().for_each(|r| totals.add(r));
        totals
    }

    fn requests(&self) -> u64 {
        let keys: u64 = self.keys.values().map(|(allowed, denied)| allowed + denied.values().sum::<u64>()).sum();
        keys + self.unattributed.values().sum::<u64>() + self.dropped
    }
}

/// The reply each shot gets from an Envoy with the same keys and routes and no `usage` (one
/// Envoy for the whole file): status and body.
fn reference(shot: &Shot) -> (u16, String) {
    struct Reference {
        _upstream: Upstream,
        _envoy: Envoy,
        replies: Vec<(u16, String)>,
    }
    static REFERENCE: OnceLock<Reference> = OnceLock::new();
    let reference = REFERENCE.get_or_init(|| {
        let upstream = Upstream::start();
        let envoy = Envoy::start(&EnvoyOptions::new(Some(&plugin(None, &[])), upstream.port()));
        let replies = ROUND.iter().map(|(s, _)| fire(envoy.port(), s, Proto::Http1).0).collect();
        Reference { _upstream: upstream, _envoy: envoy, replies }
    });
    let i =
        ROUND.iter().position(|(s, _)| s.method == shot.method && s.path == shot.path && s.key == shot.key).unwrap();
    reference.replies[i].clone()
}

/// Sends `shot` on a fresh connection: the reply's status and body, and how long it took.
fn fire(port: u16, shot: &Shot, proto: Proto) -> ((u16, String), Duration) {
    let bearer = shot.key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = bearer.iter().map(|b| ("authorization", b.as_str())).collect();
    let start = Instant::now();
    let reply = send(port, proto, shot.method, shot.path, &headers);
    ((reply.status, reply.body), start.elapsed())
}

/// Sends `rounds` rounds of [`ROUND`] over HTTP/1.1 and HTTP/2 in turn, each request on a fresh
/// connection (so the workers share them), and checks every reply against [`reference`] and
/// within [`SLOWEST_REPLY`]; returns what they should count.
fn traffic(envoy: &Envoy, rounds: usize) -> Totals {
    let mut totals = Totals::default();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        for (i, (shot, n)) in ROUND.iter().enumerate() {
            for j in 0..*n {
                let proto = Proto::ALL[(round + i + j as usize) % 2];
                let (reply, took) = fire(envoy.port(), shot, proto);
                assert_eq!(reply, reference(shot), "{shot:?} over {proto:?}: not the reply without usage");
                slowest = slowest.max(took);
            }
            totals.count(shot, *n);
        }
    }
    assert!(slowest < SLOWEST_REPLY, "a reply took {slowest:?}");
    totals
}

/// Polls `reports` until they add up to `want` (and returns them), at most `within`.
fn wait_for_totals(want: &Totals, within: Duration, reports: impl Fn() -> Vec<Report>) -> Vec<Report> {
    let deadline = Instant::now() + within;
    loop {
        let got = reports();
        let totals = Totals::of(&got);
        if totals == *want {
            return got;
        }
        if Instant::now() > deadline {
            panic!("the reports add up to\n  {totals:?}\nnot\n  {want:?}\nreports: {got:#?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// ---------------------------------------------------------------------------------------------
// The recording receiver's view

/// The POSTs the receiver got.
fn posts(receiver: &KeySetServer) -> Vec<KeySetRequest> {
    receiver.requests_for(USAGE_PATH)
}

/// Each batch the receiver took (answered 200) once, as a receiver that drops a `batch_id` it has
/// does; every POST of one batch id carried the same body.
fn taken(receiver: &KeySetServer) -> Vec<Report> {
    let mut bodies: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut took = BTreeSet::new();
    let mut reports = Vec::new();
    for post in posts(receiver) {
        assert_eq!(post.method, "POST");
        let report =
            Report::parse(&post.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&post.body)));
        let first = bodies.entry(report.batch_id.clone()).or_insert_with(|| post.body.clone());
        assert_eq!(*first, post.body, "batch {} was sent again with another body", report.batch_id);
        if post.status == Some(200) && took.insert(report.batch_id.clone()) {
            reports.push(report);
        }
    }
    reports
}

/// Waits up to 3 s for stat `name` to be `want` (an answer is counted a moment after the receiver
/// has it).
fn wait_for_stat(envoy: &Envoy, name: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while envoy.keygate_stat(name) != Some(want) {
        assert!(Instant::now() < deadline, "{name}: {:?}, not {want}", envoy.keygate_stat(name));
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A receiver that takes every report (until a test makes it fail).
fn receiver() -> KeySetServer {
    let receiver = KeySetServer::start();
    receiver.put(USAGE_PATH, &b"{\"accepted\":true}"[..]);
    receiver
}

fn batch_ids(receiver: &KeySetServer) -> Vec<String> {
    posts(receiver).iter().map(|p| Report::parse(&p.body).unwrap().batch_id).collect()
}

/// `<node>/<start>-<vm>` and `<n>` of a batch id.
fn split_batch_id(id: &str) -> (&str, u64) {
    let (reporter, n) = id.rsplit_once('/').unwrap();
    (reporter, n.parse().unwrap())
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn counts_equal_the_requests_sent_per_key_and_per_deny_kind_with_four_workers() {
    let dir = std::env::temp_dir().join(format!("keygate-usage-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("keys")).unwrap();
    let serve = KeygateServe::start(&dir, "keys", "usage");
    let upstream = Upstream::start();
    let envoy = envoy(&plugin(Some(usage(json!({}))), &[]), &upstream, serve.port, 4);
    let want = traffic(&envoy, 8);
    assert_eq!(want.requests(), 8 * 13, "public requests are not counted");
    let reports = wait_for_totals(&want, Duration::from_secs(10), || serve.reports());
    let ids: BTreeSet<&str> = reports.iter().map(|r| r.batch_id.as_str()).collect();
    assert_eq!(ids.len(), reports.len(), "a batch stored twice");
    for report in &reports {
        // Envoy 1.40's dynamic-module ABI shows a configuration no node id.
        let node = if Host::under_test() == Host::Native { "" } else { NODE };
        assert_eq!(report.node, node);
        assert!(report.batch_id.starts_with(&format!("{node}/")), "{}", report.batch_id);
        assert!(report.from_s <= report.to_s);
        assert_eq!(report.dropped, 0);
    }
    // One reporter for the process, numbering its reports from 1.
    let reporters: BTreeSet<&str> = reports.iter().map(|r| split_batch_id(&r.batch_id).0).collect();
    assert_eq!(reporters.len(), 1, "{reporters:?}");
    let numbers: Vec<u64> = reports.iter().map(|r| split_batch_id(&r.batch_id).1).collect();
    assert_eq!(numbers, (1..=reports.len() as u64).collect::<Vec<_>>());
    wait_for_stat(&envoy, "keygate.usage.reports_sent", reports.len() as u64);
    wait_for_stat(&envoy, "keygate.usage.keys_pending", 0);
    assert_eq!(envoy.keygate_stat("keygate.usage.failures"), Some(0));
    assert_eq!(envoy.keygate_stat("keygate.usage.dropped"), Some(0));
    drop(envoy);
    let (_, log) = serve.stop();
    assert!(log.iter().all(|l| !l.contains(READER) && !l.contains("1111111111")), "{log:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn exactly_one_post_per_flush_interval_per_envoy() {
    let receiver = receiver();
    let upstream = Upstream::start();
    let envoy = envoy(&plugin(Some(usage(json!({}))), &[]), &upstream, receiver.port(), 4);
    let start = Instant::now();
    let shot = &ROUND[0].0;
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(6 * FLUSH_MS) {
        fire(envoy.port(), shot, Proto::ALL[sent % 2]);
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut want = Totals::default();
    want.count(shot, sent as u64);
    wait_for_totals(&want, Duration::from_secs(5), || taken(&receiver));
    let posts = posts(&receiver);
    let gaps: Vec<u128> = posts.windows(2).map(|w| w[1].at.duration_since(w[0].at).as_millis()).collect();
    assert!((5..=8).contains(&posts.len()), "{} POSTs in about 6.5 s, gaps {gaps:?} ms", posts.len());
    assert!(gaps.iter().all(|gap| *gap >= 700), "two POSTs within one interval: gaps {gaps:?} ms");
    let ids = batch_ids(&receiver);
    let reporters: BTreeSet<&str> = ids.iter().map(|id| split_batch_id(id).0).collect();
    assert_eq!(reporters.len(), 1, "more than one VM reported: {ids:?}");
    let numbers: Vec<u64> = ids.iter().map(|id| split_batch_id(id).1).collect();
    assert_eq!(numbers, (1..=ids.len() as u64).collect::<Vec<_>>(), "each POST a new report: {ids:?}");
    for post in &posts {
        assert_eq!(post.header("content-type"), Some("application/json"));
        assert_eq!(post.header("host"), Some("usage.internal"));
    }
}

/// Traffic while the receiver misbehaves (`fail`), a second round once it has failed twice, then
/// recovery (`recover`): every reply as without usage, every count received once, and the first
/// report sent again and taken under its first batch id. Returns Envoy and the receiver.
fn recovers(fail: impl Fn(&KeySetServer), recover: impl Fn(&KeySetServer), recorded: bool) -> (Envoy, KeySetServer) {
    let receiver = receiver();
    fail(&receiver);
    let upstream = Upstream::start();
    let envoy = envoy(&plugin(Some(usage(json!({}))), &[]), &upstream, receiver.port(), 4);
    let mut want = traffic(&envoy, 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    while envoy.keygate_stat("keygate.usage.failures").unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "no two failures in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = traffic(&envoy, 2);
    for (id, (allowed, denied)) in second.keys {
        let entry = want.keys.entry(id).or_default();
        entry.0 += allowed;
        for (kind, n) in denied {
            *entry.1.entry(kind).or_default() += n;
        }
    }
    for (kind, n) in second.unattributed {
        *want.unattributed.entry(kind).or_default() += n;
    }
    assert_eq!(envoy.keygate_stat("keygate.usage.reports_sent"), Some(0));
    if recorded {
        let ids = batch_ids(&receiver);
        assert!(ids.len() >= 2 && ids.iter().all(|id| *id == ids[0]), "retries of the first report: {ids:?}");
        assert!(ids[0].ends_with("/1"), "{ids:?}");
    }
    recover(&receiver);
    let reports = wait_for_totals(&want, Duration::from_secs(15), || taken(&receiver));
    assert!(reports[0].batch_id.ends_with("/1"), "the first report, under its first batch id: {reports:#?}");
    assert!(reports.len() >= 2, "the counts made while it was retried come in the next report");
    assert_eq!(envoy.keygate_stat("keygate.usage.dropped"), Some(0));
    let log = envoy.keygate_log();
    assert!(log.contains(&format!("usage report {}", reports[0].batch_id)), "no log line of the failures");
    assert!(!log.contains(READER) && !log.contains("1111111111"), "a key in the log");
    (envoy, receiver)
}

#[test]
fn a_receiver_that_is_down_changes_no_reply_and_gets_every_count_once_it_is_up() {
    // Nothing listens on the port: every POST fails to connect.
    recovers(KeySetServer::go_down, KeySetServer::come_up, false);
}

#[test]
fn a_receiver_that_closes_without_answering_changes_no_reply_and_gets_every_count_after() {
    recovers(|r| r.set_fault(USAGE_PATH, Some(Fault::Down)), |r| r.set_fault(USAGE_PATH, None), true);
}

#[test]
fn a_slow_receiver_changes_no_reply_or_latency_and_gets_every_count_after() {
    // Three seconds, past the 500 ms timeout: each POST times out (Envoy answers the call 504)
    // and is sent again.
    let slow = |r: &KeySetServer| r.set_fault(USAGE_PATH, Some(Fault::Slow(Duration::from_secs(3))));
    let (envoy, _) = recovers(slow, |r| r.set_fault(USAGE_PATH, None), true);
    assert!(envoy.keygate_log().contains("not sent: HTTP status 504; retrying in"));
}

#[test]
fn a_receiver_answering_5xx_changes_no_reply_and_gets_every_count_after() {
    let (envoy, _) =
        recovers(|r| r.set_fault(USAGE_PATH, Some(Fault::Status(503))), |r| r.set_fault(USAGE_PATH, None), true);
    assert!(envoy.keygate_log().contains("not sent: HTTP status 503; retrying in"));
}

#[test]
fn a_receiver_answering_garbage_changes_no_reply_and_gets_every_count_after() {
    recovers(|r| r.set_fault(USAGE_PATH, Some(Fault::Garbage)), |r| r.set_fault(USAGE_PATH, None), true);
}

#[test]
fn a_report_refused_for_good_is_dropped_counted_and_not_sent_again() {
    let receiver = receiver();
    receiver.set_fault(USAGE_PATH, Some(Fault::Status(400)));
    let upstream = Upstream::start();
    let envoy = envoy(&plugin(Some(usage(json!({}))), &[]), &upstream, receiver.port(), 2);
    let first = traffic(&envoy, 1);
    // Every report while it refuses (one, or two if the traffic spanned an interval's end).
    let deadline = Instant::now() + Duration::from_secs(5);
    while envoy.keygate_stat("keygate.usage.dropped") != Some(first.requests()) {
        assert!(Instant::now() < deadline, "dropped: {:?}", envoy.keygate_stat("keygate.usage.dropped"));
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(envoy.keygate_stat("keygate.usage.failures"), Some(0));
    let refused = batch_ids(&receiver);
    assert!(!refused.is_empty() && refused.len() <= 2, "{refused:?}");
    receiver.set_fault(USAGE_PATH, None);
    let second = traffic(&envoy, 1);
    let reports = wait_for_totals(&second, Duration::from_secs(5), || taken(&receiver));
    let ids = batch_ids(&receiver);
    assert_eq!(ids[..refused.len()], refused[..]);
    let numbers: Vec<u64> = ids.iter().map(|id| split_batch_id(id).1).collect();
    assert_eq!(numbers, (1..=ids.len() as u64).collect::<Vec<_>>(), "a refused report was sent again: {ids:?}");
    assert_eq!(split_batch_id(&reports[0].batch_id).1, refused.len() as u64 + 1);
    let log = envoy.keygate_log();
    let line = format!("usage report {} refused by the receiver (HTTP status 400): not sent again, its", refused[0]);
    assert!(log.contains(&line), "{log}");
    assert!(log.contains("requests counted as dropped"));
}

#[test]
fn keys_past_max_pending_keys_are_counted_as_dropped() {
    let extra: Vec<(String, String)> =
        (1..=5).map(|i| (format!("0000e00{i}"), format!("sk_live_0000e00{i}_{}", format!("{i}").repeat(64)))).collect();
    let extra_refs: Vec<(&str, &str)> = extra.iter().map(|(id, key)| (id.as_str(), key.as_str())).collect();
    let receiver = receiver();
    let upstream = Upstream::start();
    let config = plugin(Some(usage(json!({"max_pending_keys": 2}))), &extra_refs);
    let envoy = envoy(&config, &upstream, receiver.port(), 2);
    for round in 0..2 {
        for (_, key) in &extra {
            let bearer = format!("Bearer {key}");
            let reply =
                send(envoy.port(), Proto::ALL[round], "GET", "/v1/venues/v_1/things", &[("authorization", &bearer)]);
            assert_eq!(reply.status, 200);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let reports = loop {
        let reports = taken(&receiver);
        if Totals::of(&reports).requests() == 10 {
            break reports;
        }
        assert!(Instant::now() < deadline, "10 requests, reports: {reports:#?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let totals = Totals::of(&reports);
    assert!(reports.iter().all(|r| r.keys.len() <= 2), "{reports:#?}");
    assert!(totals.dropped > 0, "{reports:#?}");
    let kept: u64 = totals.keys.values().map(|(allowed, _)| allowed).sum();
    assert_eq!(kept + totals.dropped, 10, "every request is in a report, under its key or as dropped");
    assert_eq!(envoy.keygate_stat("keygate.usage.dropped"), Some(totals.dropped));
    assert!(envoy.keygate_log().contains("requests counted under no key: usage.max_pending_keys keys are pending"));
}

#[test]
fn a_configuration_without_usage_counts_and_sends_nothing() {
    let receiver = receiver();
    let upstream = Upstream::start();
    let envoy = envoy(&plugin(None, &[]), &upstream, receiver.port(), 2);
    traffic(&envoy, 2);
    std::thread::sleep(Duration::from_millis(3 * FLUSH_MS));
    assert!(receiver.requests().is_empty(), "{:?}", receiver.requests());
    let usage_stats: Vec<String> = envoy.stats().into_keys().filter(|name| name.contains("keygate.usage.")).collect();
    assert!(usage_stats.is_empty(), "{usage_stats:?}");
}

/// The configuration delivered by ECDS from a file in the instance directory, as in
/// envoy/ecds/ (tests/ecds.rs): the bootstrap of [`envoy`] with the keygate filter named
/// `keygate` and discovered from `keygate.json`.
fn ecds_envoy(plugin: &str, upstream: &Upstream, usage_port: u16, concurrency: u32) -> Envoy {
    let mut opts = EnvoyOptions::new(Some(plugin), upstream.port());
    opts.usage_port = Some(usage_port);
    let mut bootstrap = opts.bootstrap();
    bootstrap["node"] = json!({"id": NODE, "cluster": "usage-tests"});
    let filters = bootstrap
        .pointer_mut("/static_resources/listeners/0/filter_chains/0/filters/0/typed_config/http_filters")
        .unwrap();
    let wasm = filters[0]["typed_config"].take();
    filters[0] = json!({"name": "keygate", "config_discovery": {
        "config_source": {"path_config_source": {"path": format!("{}/keygate.json", common::envoy::INSTANCE_DIR_TOKEN),
                                                 "watched_directory": {"path": common::envoy::INSTANCE_DIR_TOKEN}}},
        "type_urls": [wasm["@type"].clone()]}});
    let file = ecds_file(&wasm, plugin);
    Envoy::try_start_with_files(&bootstrap.to_string(), "json", concurrency, &[("keygate.json", &file)])
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 60)))
}

/// An ECDS file holding the filter `wasm` (its typed config: the wasm filter's, or the native
/// module's) with `plugin` as its configuration.
fn ecds_file(wasm: &Value, plugin: &str) -> String {
    let mut wasm = wasm.clone();
    if wasm.get("filter_config").is_some() {
        wasm["filter_config"]["value"] = json!(plugin);
    } else {
        wasm["config"]["configuration"]["value"] = json!(plugin);
    }
    json!({"resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                          "name": "keygate", "typed_config": wasm}]})
    .to_string()
}

#[test]
fn an_ecds_update_keeping_usage_hands_every_count_to_the_new_configuration() {
    const NEW: &str = "sk_live_0000ffff_5555555555555555555555555555555555555555555555555555555555555555";
    let receiver = receiver();
    let upstream = Upstream::start();
    let before = plugin(Some(usage(json!({}))), &[]);
    let envoy = ecds_envoy(&before, &upstream, receiver.port(), 2);
    let mut want = traffic(&envoy, 2);
    // The same `usage`, one key more: a new configuration in every VM, whose old one goes away.
    let wasm = {
        let text = std::fs::read_to_string(envoy.dir().join("keygate.json")).unwrap();
        let file: Value = serde_json::from_str(&text).unwrap();
        file["resources"][0]["typed_config"].clone()
    };
    let tmp = envoy.dir().join("keygate.json.tmp");
    std::fs::write(&tmp, ecds_file(&wasm, &plugin(Some(usage(json!({}))), &[("0000ffff", NEW)]))).unwrap();
    std::fs::rename(&tmp, envoy.dir().join("keygate.json")).unwrap();
    // The new key is unknown (invalid_key) until the new configuration serves, then allowed.
    let new_key = shot("GET", "/v1/venues/v_1/things", Some(NEW), None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ((status, _), _) = fire(envoy.port(), &new_key, Proto::Http1);
        match status {
            401 => want.count(&shot("GET", "", None, None, Some("invalid_key")), 1),
            200 => {
                want.count(&shot("GET", "", None, Some("0000ffff"), None), 1);
                break;
            }
            other => panic!("{other}"),
        }
        assert!(Instant::now() < deadline, "the new configuration did not serve within 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let second = traffic(&envoy, 2);
    for (id, (allowed, denied)) in second.keys {
        let entry = want.keys.entry(id).or_default();
        entry.0 += allowed;
        for (kind, n) in denied {
            *entry.1.entry(kind).or_default() += n;
        }
    }
    for (kind, n) in second.unattributed {
        *want.unattributed.entry(kind).or_default() += n;
    }
    // What the old configuration had counted and not yet sent when it went away was handed to
    // the new one, whose reporter sends it.
    let reports = wait_for_totals(&want, Duration::from_secs(10), || taken(&receiver));
    assert_eq!(envoy.keygate_stat("keygate.usage.dropped"), Some(0));
    let ids: BTreeSet<&str> = reports.iter().map(|r| r.batch_id.as_str()).collect();
    assert_eq!(ids.len(), reports.len());
}
