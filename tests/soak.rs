//! `make soak`: mixed traffic for `SOAK_SECONDS` (default 600) while the live key set is revoked and
//! re-issued every few seconds, and, every fourth cycle, the key-set endpoint misbehaves for a while
//! (down, 5xx, slow past the timeout, HTML, truncated JSON) so the last good set must keep serving. 90 % of requests carry a valid key (many keys, some bound to a venue),
//! 10 % are hostile. Every reply is checked against what the key set said at the time, allowing a
//! change the poll interval plus a second to reach Envoy. Prints requests served, wrong answers
//! (must be 0), 5xx (must be 0) and Envoy's resident memory after warm-up and at the end (must be
//! flat).
//!
//! Usage reporting is on throughout, to a receiver of its own (the tests' key-set server, taking
//! every `POST`; the endpoint's faults do not touch it). At the end the soak waits for the last
//! report and checks that the reports, each `batch_id` counted once, add up to the replies it got:
//! per key id, the requests allowed (every 200), and the refusals by status (401s, 403s), since a
//! refusal's kind is not always certain from outside (a revoked key is `revoked_key` under its id
//! while the set lists it, and `invalid_key` with no id once it is removed). Nothing may be
//! dropped. The summary prints the totals.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::keyset::{Fault, KeySetServer};
use common::{Envoy, EnvoyOptions, Proto, Upstream, USAGE_CLUSTER};
use keygate_core::keys::hash_key;
use keygate_core::usage::Report;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const POLL_MS: u64 = 500;
/// How long a published change may take to reach Envoy.
const GRACE: Duration = Duration::from_millis(POLL_MS + 1000);
const SLOTS: usize = 60;
const MANIFEST: &str = "/keyset/manifest.json";
const USAGE_PATH: &str = "/usage";
const FLUSH_MS: u64 = 1_000;
/// How long the last requests' counts may take to arrive once the traffic stops: the interval,
/// a tick, a retry.
const LAST_REPORT: Duration = Duration::from_millis(3 * FLUSH_MS + 2_000);

/// One key ever issued.
#[derive(Clone)]
struct Issued {
    key: String,
    id: String,
    venue: Option<String>,
    issued: Instant,
    revoked: Option<Instant>,
    /// Removed from the key set altogether (after being revoked for a while).
    removed: bool,
}

impl Issued {
    fn record(&self) -> Value {
        let mut r = json!({"id": self.id, "hash": hex::encode(hash_key(self.key.as_bytes())), "org": "org_soak",
                           "scopes": ["venues:read"], "revoked": self.revoked.is_some()});
        if let Some(v) = &self.venue {
            r["attributes"] = json!({"venue": v});
        }
        r
    }

    /// Settled at `now`: its last change is older than the grace period, so its answer is certain.
    fn settled(&self, now: Instant) -> bool {
        let last = self.revoked.unwrap_or(self.issued);
        now.duration_since(last) > GRACE
    }
}

/// Every key ever issued, and the keys each slot holds now.
struct Model {
    issued: Vec<Issued>,
    slots: Vec<usize>,
    version: u64,
    next: u64,
}

impl Model {
    fn issue(&mut self, venue: Option<String>) -> usize {
        self.next += 1;
        let id = format!("{:08x}", self.next);
        let key = format!("sk_live_{id}_{}", hex::encode(hash_key(format!("soak-{}", self.next).as_bytes())));
        self.issued.push(Issued { key, id, venue, issued: Instant::now(), revoked: None, removed: false });
        self.issued.len() - 1
    }

    fn records(&self) -> Vec<Value> {
        self.issued.iter().filter(|k| !k.removed).map(Issued::record).collect()
    }
}

fn publish(server: &KeySetServer, model: &mut Model) {
    model.version += 1;
    server.publish(&model.records(), 1, model.version);
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A small deterministic random source (xorshift), so a run can be repeated.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[derive(Default)]
struct Tally {
    requests: AtomicU64,
    wrong: AtomicU64,
    server_errors: AtomicU64,
    unsettled: AtomicU64,
    /// What usage reports must add up to, from the replies.
    usage: Mutex<Usage>,
}

/// Usage as the soak can know it from outside: requests allowed per key id, refusals by status,
/// and requests counted in no report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Usage {
    allowed: BTreeMap<String, u64>,
    denied: BTreeMap<u16, u64>,
    dropped: u64,
}

impl Usage {
    /// A reply to a request carrying the key of record `key_id`, if any. A 5xx is no decision of
    /// keygate's (and fails the soak on its own).
    fn count(&mut self, status: u16, key_id: Option<&str>) {
        match status {
            200 => *self.allowed.entry(key_id.unwrap_or("(allowed with no key)").to_string()).or_default() += 1,
            400..=499 => *self.denied.entry(status).or_default() += 1,
            _ => {}
        }
    }

    /// What `reports` add up to, each refusal under the status of its kind.
    fn of(reports: &[Report]) -> Usage {
        let mut usage = Usage::default();
        for report in reports {
            for (id, key) in &report.keys {
                if key.allowed > 0 {
                    *usage.allowed.entry(id.clone()).or_default() += key.allowed;
                }
                for (kind, n) in key.denied.iter() {
                    *usage.denied.entry(kind.default_status()).or_default() += n;
                }
            }
            for (kind, n) in report.unattributed.iter() {
                *usage.denied.entry(kind.default_status()).or_default() += n;
            }
            usage.dropped += report.dropped;
        }
        usage
    }

    fn allowed(&self) -> u64 {
        self.allowed.values().sum()
    }

    fn denied(&self, status: u16) -> u64 {
        self.denied.get(&status).copied().unwrap_or(0)
    }
}

/// The entries where `got` and `want` differ: (key, got, want), `None` where one has none.
fn differences<K: Ord + Clone>(got: &BTreeMap<K, u64>, want: &BTreeMap<K, u64>) -> Vec<(K, Option<u64>, Option<u64>)> {
    let keys: BTreeSet<&K> = got.keys().chain(want.keys()).collect();
    keys.into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .map(|k| ((*k).clone(), got.get(k).copied(), want.get(k).copied()))
        .collect()
}

/// The reports the receiver took, each `batch_id` once (as a receiver that drops a batch it has
/// does), and how many `POST`s repeated a batch it had. A repeated batch must carry the same body.
fn received(receiver: &KeySetServer) -> (Vec<Report>, usize) {
    let mut first: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut taken = BTreeSet::new();
    let (mut reports, mut repeated) = (Vec::new(), 0);
    for post in receiver.requests_for(USAGE_PATH) {
        let report =
            Report::parse(&post.body).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&post.body)));
        let body = first.entry(report.batch_id.clone()).or_insert_with(|| post.body.clone());
        assert_eq!(*body, post.body, "batch {} was sent again with another body", report.batch_id);
        if post.status != Some(200) {
            continue;
        }
        if taken.insert(report.batch_id.clone()) {
            reports.push(report);
        } else {
            repeated += 1;
        }
    }
    (reports, repeated)
}

/// A request of the mix: path, headers, the statuses that are right, and the id of the key record
/// its key is, if it is one (what usage counts an allowed request under).
type Planned = (String, Vec<(String, String)>, Vec<u16>, Option<String>);

/// One request of the mix.
fn one_request(model: &Model, rng: &mut Rng, now: Instant) -> Option<Planned> {
    let settled_active: Vec<&Issued> =
        model.issued.iter().filter(|k| k.revoked.is_none() && !k.removed && k.settled(now)).collect();
    let settled_revoked: Vec<&Issued> = model.issued.iter().filter(|k| k.revoked.is_some() && k.settled(now)).collect();
    let pick = settled_active.get(rng.below(settled_active.len().max(1)))?;
    let venue = pick.venue.clone().unwrap_or_else(|| "v_1".into());
    let ok_path = format!("/v1/venues/{venue}/treatments");
    let bearer = |k: &str| vec![("authorization".to_string(), format!("Bearer {k}"))];
    let id = Some(pick.id.clone());
    if rng.below(10) != 0 {
        // 90 %: a valid key, in either header.
        let headers = if rng.below(2) == 0 { bearer(&pick.key) } else { vec![("x-api-key".into(), pick.key.clone())] };
        return Some((ok_path, headers, vec![200], id));
    }
    let hostile = rng.below(7);
    Some(match hostile {
        0 => (ok_path, vec![], vec![401], None),
        1 => match settled_revoked.get(rng.below(settled_revoked.len().max(1))) {
            Some(r) => (ok_path, bearer(&r.key), vec![401], Some(r.id.clone())),
            None => (ok_path, bearer("sk_live_00000000_unknown"), vec![401], None),
        },
        2 => (ok_path, bearer(&format!("{}x", pick.key)), vec![401], None),
        3 => (ok_path, bearer(&pick.key.replace("sk_live_", "sk_test_")), vec![401], None),
        4 if pick.venue.is_some() => ("/v1/venues/v_other/treatments".into(), bearer(&pick.key), vec![403], id),
        5 if pick.venue.is_some() => {
            (format!("/v1/venues/{venue}/../v_other/treatments"), bearer(&pick.key), vec![403], id)
        }
        _ => {
            let mut h = bearer(&pick.key);
            h.push(("x-org-id".into(), "org_evil".into()));
            (ok_path, h, vec![200], id)
        }
    })
}

#[test]
#[ignore = "long: run with `make soak` (SOAK_SECONDS, default 600)"]
fn soak_mixed_traffic_while_keys_are_revoked_and_reissued() {
    let seconds: u64 = std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(600);
    let duration = Duration::from_secs(seconds);
    let warm_up = Duration::from_secs((seconds / 10).clamp(5, 60));

    let server = KeySetServer::start();
    let mut model = Model { issued: Vec::new(), slots: Vec::new(), version: 0, next: 0 };
    for slot in 0..SLOTS {
        let venue = (slot % 2 == 0).then(|| format!("v_{slot}"));
        let i = model.issue(venue);
        model.slots.push(i);
    }
    publish(&server, &mut model);
    let receiver = KeySetServer::start();
    receiver.put(USAGE_PATH, &b"{\"accepted\":true}"[..]);
    let upstream = Upstream::start();
    let config = json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "key_set": {"cluster": "keyset", "path": MANIFEST, "poll_interval_ms": POLL_MS, "timeout_ms": 300},
        "usage": {"cluster": USAGE_CLUSTER, "authority": "usage.internal", "path": USAGE_PATH,
                  "flush_interval_ms": FLUSH_MS, "timeout_ms": 500},
        "routes": [{"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}]
    });
    let mut opts = EnvoyOptions::new(Some(&config.to_string()), upstream.port());
    opts.keyset_port = Some(server.port());
    opts.usage_port = Some(receiver.port());
    opts.concurrency = 2;
    opts.failure_policy = Some("FAIL_RELOAD".into());
    let envoy = Envoy::start(&opts);
    // Start once everything is settled.
    std::thread::sleep(GRACE + Duration::from_millis(200));
    for k in &mut model.issued {
        k.issued -= GRACE;
    }

    let model = Arc::new(Mutex::new(model));
    let tally = Arc::new(Tally::default());
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let faults_injected = AtomicU64::new(0);
    let started = Instant::now();

    let (rss_start, rss_end) = {
        let (model, stop, changes) = (model.clone(), stop.clone(), changes.clone());
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut rng = Rng(0x5eed);
                let faults = [
                    Fault::Down,
                    Fault::Status(503),
                    Fault::Slow(Duration::from_millis(800)),
                    Fault::Html,
                    Fault::Truncated,
                ];
                let mut cycle = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_secs(3));
                    cycle += 1;
                    if cycle % 4 == 0 {
                        // The endpoint misbehaves; nothing changes, so every answer must stay as it was.
                        server.set_global_fault(Some(faults[(cycle / 4) % faults.len()].clone()));
                        std::thread::sleep(Duration::from_secs(3));
                        server.clear_faults();
                        faults_injected.fetch_add(1, Ordering::Relaxed);
                        // Let the backoff (at most ten poll intervals) run out before the next change.
                        std::thread::sleep(Duration::from_millis(10 * POLL_MS + 1000));
                        continue;
                    }
                    let mut m = model.lock().unwrap();
                    let now = Instant::now();
                    // Drop keys revoked long ago, revoke five, issue their successors.
                    for k in
                        m.issued.iter_mut().filter(|k| k.revoked.is_some_and(|r| now.duration_since(r) > 4 * GRACE))
                    {
                        k.removed = true;
                    }
                    for _ in 0..5 {
                        let slot = rng.below(SLOTS);
                        let old = m.slots[slot];
                        if m.issued[old].revoked.is_some() {
                            continue;
                        }
                        m.issued[old].revoked = Some(now);
                        let venue = m.issued[old].venue.clone();
                        let new = m.issue(venue);
                        m.slots[slot] = new;
                        changes.fetch_add(1, Ordering::Relaxed);
                    }
                    publish(&server, &mut m);
                }
            });
            for (worker, proto) in [(1u64, Proto::Http1), (2, Proto::Http2), (3, Proto::Http1)] {
                let (model, tally, stop) = (model.clone(), tally.clone(), stop.clone());
                let port = envoy.port();
                scope.spawn(move || {
                    let mut rng = Rng(0x9e3779b97f4a7c15 ^ worker);
                    while !stop.load(Ordering::Relaxed) {
                        let sent_at = Instant::now();
                        let Some((path, headers, expected, key_id)) =
                            one_request(&model.lock().unwrap(), &mut rng, sent_at)
                        else {
                            continue;
                        };
                        let headers: Vec<(&str, &str)> =
                            headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
                        let reply = common::get(port, proto, &path, &headers);
                        tally.requests.fetch_add(1, Ordering::Relaxed);
                        tally.usage.lock().unwrap().count(reply.status, key_id.as_deref());
                        if reply.status >= 500 {
                            tally.server_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        if !expected.contains(&reply.status) {
                            // A key that changed while the request was in flight is not certain.
                            let m = model.lock().unwrap();
                            let now = Instant::now();
                            let certain = m
                                .issued
                                .iter()
                                .all(|k| k.settled(now) || !headers.iter().any(|(_, v)| v.contains(&k.key)));
                            if certain {
                                tally.wrong.fetch_add(1, Ordering::Relaxed);
                                eprintln!(
                                    "soak: wrong answer {} (expected {expected:?}) for {path} {headers:?}",
                                    reply.status
                                );
                            } else {
                                tally.unsettled.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                });
            }
            scope
                .spawn(|| {
                    std::thread::sleep(warm_up);
                    let rss_start = rss_kib(envoy.pid());
                    while started.elapsed() < duration {
                        std::thread::sleep(Duration::from_millis(500));
                        upstream.clear();
                    }
                    let rss_end = rss_kib(envoy.pid());
                    stop.store(true, Ordering::Relaxed);
                    (rss_start, rss_end)
                })
                .join()
                .unwrap()
        })
    };
    let requests = tally.requests.load(Ordering::Relaxed);
    let wrong = tally.wrong.load(Ordering::Relaxed);
    let server_errors = tally.server_errors.load(Ordering::Relaxed);

    // The traffic has stopped: the reports must come to what the replies said, once the last is in.
    let sent = tally.usage.lock().unwrap().clone();
    let waited = Instant::now();
    let (reports, repeated) = loop {
        let (reports, repeated) = received(&receiver);
        if Usage::of(&reports) == sent || waited.elapsed() > LAST_REPORT {
            break (reports, repeated);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let got = Usage::of(&reports);
    let posts = receiver.count(USAGE_PATH);
    let (failures, dropped) =
        (envoy.keygate_stat("keygate.usage.failures"), envoy.keygate_stat("keygate.usage.dropped"));

    println!(
        "soak: {seconds} s, {requests} requests served, {wrong} wrong answers, {server_errors} 5xx, {} keys revoked and \
         re-issued, {} endpoint faults, Envoy RSS {} MiB after {} s warm-up and {} MiB at the end",
        changes.load(Ordering::Relaxed),
        faults_injected.load(Ordering::Relaxed),
        rss_start / 1024,
        warm_up.as_secs(),
        rss_end / 1024
    );
    println!(
        "soak: usage: {} reports taken ({posts} POSTs, {repeated} repeating a batch id, counted once), \
         {} requests in them: {} allowed under {} key ids, {} refused 401, {} refused 403, {} dropped; \
         sent: {} allowed under {} key ids, {} refused 401, {} refused 403; keygate.usage.failures {}, \
         keygate.usage.dropped {}",
        reports.len(),
        got.allowed() + got.denied.values().sum::<u64>() + got.dropped,
        got.allowed(),
        got.allowed.len(),
        got.denied(401),
        got.denied(403),
        got.dropped,
        sent.allowed(),
        sent.allowed.len(),
        sent.denied(401),
        sent.denied(403),
        failures.map_or("-".into(), |n| n.to_string()),
        dropped.map_or("-".into(), |n| n.to_string()),
    );
    assert!(requests > seconds, "too few requests to mean anything: {requests}");
    assert_eq!(wrong, 0, "wrong answers");
    assert_eq!(server_errors, 0, "5xx replies");
    assert!(rss_end <= rss_start + rss_start / 10 + 4096, "Envoy's memory grew: {rss_start} KiB -> {rss_end} KiB");
    assert_eq!(sent.allowed() + sent.denied.values().sum::<u64>(), requests, "a reply that is neither 200 nor 4xx");
    let allowed = differences(&got.allowed, &sent.allowed);
    assert!(allowed.is_empty(), "usage reports: requests allowed per key id (reported, replied): {allowed:?}");
    let denied = differences(&got.denied, &sent.denied);
    assert!(denied.is_empty(), "usage reports: refusals by status (reported, replied): {denied:?}");
    assert_eq!((got.dropped, dropped), (0, Some(0)), "requests dropped from usage reports");
}
