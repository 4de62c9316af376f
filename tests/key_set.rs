//! Key sets fetched from a key-set endpoint (README "Key distribution", part 2), in a real Envoy
//! with the tests' own key-set server on loopback (tests/common/keyset.rs): changes take effect
//! within a poll interval plus a second, a misbehaving endpoint never changes the set that serves,
//! a cold start without the endpoint refuses with 503 until it comes up, one VM per Envoy polls,
//! and the conditional requests and stats work as documented.
//!
//! They run on both hosts (`KEYGATE_TEST_HOST`). On the native module "one VM polls" is one
//! poller per process; the two tests that plant proxy-wasm shared data through the probe build
//! say so and run on the wasm filter only.
//!
//! The first tests check the key-set server itself, with no Envoy.
//!
//! Timing bounds are generous (a shared 2-core machine runs these) but each one can fail: a
//! change must show within `poll_interval_ms + 1 s`, a recovery within the backoff cap plus the
//! fetch timeout plus a second.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::envoy::Host;
use common::keyset::{sha256_hex, shard_body, KEYSET_DIR};
use common::{
    get, try_raw_http1, Envoy, EnvoyOptions, Fault, KeySetServer, Proto, Publication, Response, Upstream, MANIFEST_PATH,
};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Keys, records and the plugin configuration

/// A demo key for `id`: `sk_live_<id>_<64 hex>`, the same every run.
fn key(id: &str) -> String {
    format!("sk_live_{id}_{}", sha256_hex(format!("secret of {id}").as_bytes()))
}

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

/// The key record of `key(id)`.
fn record(id: &str) -> Value {
    json!({"id": id, "hash": hash(&key(id)), "org": "org_42", "scopes": ["things:read"]})
}

fn revoked(id: &str) -> Value {
    let mut r = record(id);
    r["revoked"] = json!(true);
    r
}

/// Ids whose keys' hashes start with different hex digits (so with 1-digit shards each lives in a
/// shard of its own): found by counting up from `base`, the same every run.
fn ids_in_distinct_shards(base: &str, n: usize) -> Vec<String> {
    let mut ids: Vec<String> = Vec::new();
    let mut prefixes = Vec::new();
    for i in 0.. {
        let id = format!("{base}{i:02}");
        let prefix = hash(&key(&id))[..1].to_string();
        if !prefixes.contains(&prefix) {
            prefixes.push(prefix);
            ids.push(id);
            if ids.len() == n {
                return ids;
            }
        }
    }
    unreachable!()
}

const POLL_MS: u64 = 500;
const TIMEOUT_MS: u64 = 300;
/// A VM's tick with `POLL_MS`: a fifth of the poll interval, at least 100 ms (README), and some slack.
const TICK: Duration = Duration::from_millis(POLL_MS / 5 + 150);
/// How long a change may take to show: one poll interval plus a second.
const CHANGE_BOUND: Duration = Duration::from_millis(POLL_MS + 1000);
/// How long a recovery may take once the endpoint behaves: the backoff cap (ten poll intervals,
/// README), the fetch timeout, and a second.
const RECOVERY_BOUND: Duration = Duration::from_millis(10 * POLL_MS + TIMEOUT_MS + 1000);
/// The route every test calls.
const PATH: &str = "/v1/things";

fn plugin_config(opts: &SetupOptions, timeout_ms: u64) -> String {
    let mut config = json!({
        "credential": {"prefixes": ["sk_live_"]},
        "keys": opts.inline,
        "key_set": {"cluster": "keyset", "authority": "keys.internal", "path": MANIFEST_PATH,
                    "poll_interval_ms": opts.poll_ms, "timeout_ms": timeout_ms},
    });
    if let Some(errors) = &opts.errors {
        config["errors"] = errors.clone();
    }
    if let Some(routes) = &opts.routes {
        config["routes"] = routes.clone();
    }
    for (field, value) in opts.key_set.as_object().into_iter().flatten() {
        config["key_set"][field] = value.clone();
    }
    config.to_string()
}

/// A key-set server, a recording upstream and an Envoy whose keygate polls that server.
struct Setup {
    server: KeySetServer,
    upstream: Upstream,
    envoy: Envoy,
}

struct SetupOptions {
    inline: Vec<Value>,
    poll_ms: u64,
    concurrency: u32,
    errors: Option<Value>,
    routes: Option<Value>,
    /// More `key_set` fields (an object).
    key_set: Value,
    /// The crash-on-demand build instead of the filter (`make build-probe`).
    probe: bool,
    failure_policy: &'static str,
}

impl Default for SetupOptions {
    fn default() -> Self {
        SetupOptions {
            inline: Vec::new(),
            poll_ms: POLL_MS,
            concurrency: 1,
            errors: None,
            routes: None,
            key_set: json!({}),
            probe: false,
            failure_policy: "FAIL_CLOSED",
        }
    }
}

impl Setup {
    /// Starts Envoy against `server` (already publishing, or down).
    fn start(server: KeySetServer, opts: SetupOptions) -> Setup {
        let upstream = Upstream::start();
        let config = plugin_config(&opts, TIMEOUT_MS);
        let mut envoy_opts = EnvoyOptions::new(Some(&config), upstream.port());
        envoy_opts.keyset_port = Some(server.port());
        envoy_opts.concurrency = opts.concurrency;
        assert!(
            !opts.probe || envoy_opts.host == Host::Wasm,
            "the probe build plants proxy-wasm shared data: wasm only"
        );
        envoy_opts.wasm = opts.probe.then(common::envoy::probe_wasm_path);
        envoy_opts.failure_policy = Some(opts.failure_policy.into());
        let envoy = Envoy::start(&envoy_opts);
        Setup { server, upstream, envoy }
    }

    /// A server publishing `records` (1-digit shards, `version`), and Envoy once it has loaded them.
    fn loaded(records: &[Value], version: u64) -> Setup {
        Setup::loaded_with(records, version, SetupOptions::default())
    }

    fn loaded_with(records: &[Value], version: u64, opts: SetupOptions) -> Setup {
        let server = KeySetServer::start();
        server.publish(records, 1, version);
        let setup = Setup::start(server, opts);
        setup.wait_loaded(version, Duration::from_secs(10));
        setup
    }

    /// Waits until the version gauge shows `version`; panics with keygate's log otherwise.
    fn wait_loaded(&self, version: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.stat("version") != Some(version) {
            if Instant::now() >= deadline {
                panic!(
                    "key set version {version} not loaded within {timeout:?}; version gauge {:?}\nkeygate log:\n{}",
                    self.stat("version"),
                    self.envoy.keygate_log()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `keygate.key_set.<name>` (under the host's prefix).
    fn stat(&self, name: &str) -> Option<u64> {
        self.envoy.keygate_stat(&format!("keygate.key_set.{name}"))
    }

    fn failures(&self) -> u64 {
        self.stat("sync_failures").unwrap_or(0)
    }

    fn call(&self, proto: Proto, key: &str) -> Response {
        let auth = format!("Bearer {key}");
        get(self.envoy.port(), proto, PATH, &[("authorization", &auth)])
    }

    fn status(&self, proto: Proto, key: &str) -> u16 {
        self.call(proto, key).status
    }

    /// Asserts `key` gets `want` over HTTP/1.1 and HTTP/2, within one tick: a VM drops the records
    /// it decoded on its next tick after a sync changed them (README), so a change may trail the
    /// version gauge by that much.
    fn expect(&self, key_id: &str, want: u16, context: &str) {
        for proto in Proto::ALL {
            let deadline = Instant::now() + TICK;
            let mut reply = self.call(proto, &key(key_id));
            while reply.status != want && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                reply = self.call(proto, &key(key_id));
            }
            assert_eq!(reply.status, want, "{context}: key {key_id} over {proto:?}: {reply:?}");
        }
    }

    /// Calls with `key` every 25 ms, alternating HTTP/1.1 and HTTP/2, until the status is `want`;
    /// returns how long that took, or `None` after `timeout`.
    fn time_until(&self, key: &str, want: u16, timeout: Duration) -> Option<Duration> {
        let start = Instant::now();
        let mut protos = Proto::ALL.iter().cycle();
        loop {
            let proto = *protos.next().unwrap();
            if self.status(proto, key) == want {
                return Some(start.elapsed());
            }
            if start.elapsed() >= timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The key-set server itself

fn http_get(port: u16, path: &str, extra: &str) -> Result<Response, String> {
    try_raw_http1(port, format!("GET {path} HTTP/1.1\r\nhost: keys.internal\r\n{extra}\r\n").as_bytes())
}

#[test]
fn keyset_server_publishes_the_readme_layout() {
    let server = KeySetServer::start();
    let records = [record("aa"), record("bb"), record("cc")];
    let published = server.publish(&records, 1, 1732355000);

    let manifest: Value = serde_json::from_str(&http_get(server.port(), MANIFEST_PATH, "").unwrap().body).unwrap();
    assert_eq!(manifest["version"], "1732355000");
    let entries = manifest["shards"].as_array().unwrap();
    assert_eq!(entries.len(), 16);
    let mut placed = 0;
    for (n, entry) in entries.iter().enumerate() {
        let prefix = format!("{n:x}");
        assert_eq!(entry["prefix"], prefix.as_str());
        assert_eq!(entry["path"], format!("shards/{prefix}.json"));
        let reply = http_get(server.port(), &format!("{KEYSET_DIR}shards/{prefix}.json"), "").unwrap();
        assert_eq!(reply.status, 200);
        assert_eq!(entry["etag"], sha256_hex(reply.body.as_bytes()), "shard {prefix}");
        let shard: Value = serde_json::from_str(&reply.body).unwrap();
        for r in shard["keys"].as_array().unwrap() {
            assert!(r["hash"].as_str().unwrap().starts_with(&prefix), "{r} in shard {prefix}");
            placed += 1;
        }
    }
    assert_eq!(placed, 3);
    assert_eq!(published.shard_of(records[0]["hash"].as_str().unwrap()).body, {
        let prefix = &records[0]["hash"].as_str().unwrap()[..1];
        server.body(&format!("{KEYSET_DIR}shards/{prefix}.json")).unwrap()
    });

    // No digits: one shard, prefix "", at shards/all.json.
    server.publish(&records, 0, 7);
    let manifest: Value = serde_json::from_str(&http_get(server.port(), MANIFEST_PATH, "").unwrap().body).unwrap();
    assert_eq!(manifest["version"], "7");
    let all = server.body("/keyset/shards/all.json").unwrap();
    assert_eq!(manifest["shards"], json!([{"prefix": "", "path": "shards/all.json", "etag": sha256_hex(&all)}]));
    assert_eq!(serde_json::from_slice::<Value>(&all).unwrap(), json!({"keys": records}));
}

#[test]
fn keyset_server_answers_304_to_a_matching_if_none_match() {
    let server = KeySetServer::start();
    server.publish(&[record("aa")], 0, 1);
    let first = http_get(server.port(), MANIFEST_PATH, "").unwrap();
    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("application/json"));
    let etag = first.header("etag").unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(first.body.as_bytes())));

    let again = http_get(server.port(), MANIFEST_PATH, &format!("if-none-match: {etag}\r\n")).unwrap();
    assert_eq!((again.status, again.body.as_str()), (304, ""));
    assert_eq!(again.header("etag"), Some(etag.as_str()));
    let other = http_get(server.port(), MANIFEST_PATH, "if-none-match: \"other\"\r\n").unwrap();
    assert_eq!((other.status, other.body.as_str()), (200, first.body.as_str()));

    server.publish(&[record("aa"), record("bb")], 0, 2);
    let changed = http_get(server.port(), MANIFEST_PATH, &format!("if-none-match: {etag}\r\n")).unwrap();
    assert_eq!(changed.status, 200);
    assert_ne!(changed.header("etag"), Some(etag.as_str()));

    server.set_etags(false);
    let plain = http_get(server.port(), MANIFEST_PATH, "if-none-match: *\r\n").unwrap();
    assert_eq!((plain.status, plain.header("etag")), (200, None));

    assert_eq!(http_get(server.port(), "/keyset/nothing.json", "").unwrap().status, 404);
    let statuses: Vec<Option<u16>> = server.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(200), Some(304), Some(200), Some(200), Some(200), Some(404)]);
}

#[test]
fn keyset_server_faults_misbehave_as_named() {
    let server = KeySetServer::start();
    server.publish(&[record("aa")], 0, 1);
    let port = server.port();
    let manifest = String::from_utf8(server.body(MANIFEST_PATH).unwrap()).unwrap();

    server.set_fault(MANIFEST_PATH, Some(Fault::Status(503)));
    let reply = http_get(port, MANIFEST_PATH, "").unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (503, "status 503\n"));

    server.set_fault(MANIFEST_PATH, Some(Fault::Html));
    let reply = http_get(port, MANIFEST_PATH, "").unwrap();
    assert_eq!((reply.status, reply.header("content-type")), (200, Some("text/html; charset=utf-8")));
    assert!(reply.body.starts_with("<!DOCTYPE html>"), "{reply:?}");

    server.set_fault(MANIFEST_PATH, Some(Fault::Truncated));
    let reply = http_get(port, MANIFEST_PATH, "").unwrap();
    assert_eq!((reply.status, reply.body.as_str()), (200, &manifest[..manifest.len() / 2]));

    server.set_fault(MANIFEST_PATH, Some(Fault::CutOff));
    let err = http_get(port, MANIFEST_PATH, "").unwrap_err();
    assert!(err.contains("reading reply body"), "{err}");

    server.set_fault(MANIFEST_PATH, Some(Fault::Down));
    let err = http_get(port, MANIFEST_PATH, "").unwrap_err();
    assert!(err.contains("connection closed with no reply") || err.contains("reset"), "{err}");

    server.set_fault(MANIFEST_PATH, Some(Fault::Slow(Duration::from_millis(400))));
    let start = Instant::now();
    let reply = http_get(port, MANIFEST_PATH, "").unwrap();
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
    assert_eq!((reply.status, reply.body.as_str()), (200, manifest.as_str()));

    // A global fault applies to every path without a fault of its own.
    server.set_fault(MANIFEST_PATH, Some(Fault::Status(502)));
    server.set_global_fault(Some(Fault::Status(500)));
    assert_eq!(http_get(port, MANIFEST_PATH, "").unwrap().status, 502);
    assert_eq!(http_get(port, "/keyset/shards/all.json", "").unwrap().status, 500);

    server.clear_faults();
    assert_eq!(http_get(port, MANIFEST_PATH, "").unwrap().body, manifest);
    assert_eq!(http_get(port, "/keyset/shards/all.json", "").unwrap().status, 200);
    // The request answered by closing the connection (Down) is recorded with no status.
    let statuses: Vec<Option<u16>> = server.requests_for(MANIFEST_PATH).iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(503), Some(200), Some(200), Some(200), None, Some(200), Some(502), Some(200)]);
}

#[test]
fn keyset_server_goes_down_and_comes_up_on_the_same_port() {
    let server = KeySetServer::start();
    server.publish(&[record("aa")], 0, 1);
    let port = server.port();
    assert_eq!(http_get(port, MANIFEST_PATH, "").unwrap().status, 200);

    server.go_down();
    assert!(!server.is_up());
    let err = http_get(port, MANIFEST_PATH, "").unwrap_err();
    assert!(err.contains("connect"), "{err}");

    server.come_up();
    assert_eq!(server.port(), port);
    assert_eq!(http_get(port, MANIFEST_PATH, "").unwrap().status, 200);

    let later = KeySetServer::start_down();
    later.publish(&[record("aa")], 0, 1);
    assert!(http_get(later.port(), MANIFEST_PATH, "").unwrap_err().contains("connect"));
    later.come_up();
    assert_eq!(http_get(later.port(), MANIFEST_PATH, "").unwrap().status, 200);
}

#[test]
fn keyset_server_keeps_connections_alive_and_records_requests() {
    use std::io::{BufReader, Write};
    let server = KeySetServer::start();
    server.publish(&[record("aa")], 0, 1);
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", server.port())).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let before = Instant::now();
    for path in [MANIFEST_PATH, "/keyset/shards/all.json"] {
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: keys.internal\r\nx-n: 1\r\n\r\n").as_bytes()).unwrap();
        let head = common::http1::read_head(&mut reader).unwrap().unwrap();
        assert!(head.start_line.starts_with("HTTP/1.1 200"), "{}", head.start_line);
        common::http1::read_response_body(&mut reader, &head, 200, false).unwrap();
    }
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!((requests[0].method.as_str(), requests[0].path.as_str()), ("GET", MANIFEST_PATH));
    assert_eq!(requests[1].path, "/keyset/shards/all.json");
    assert_eq!(requests[0].header("Host"), Some("keys.internal"));
    assert_eq!(requests[0].header("x-n"), Some("1"));
    assert!(requests[0].at >= before && requests[1].at >= requests[0].at);
    assert_eq!(server.count(MANIFEST_PATH), 1);
    server.clear_requests();
    assert!(server.requests().is_empty());
    // Drop closes the open connection and joins its thread (the test would hang otherwise).
    drop(server);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    assert!(rest.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Changes take effect within a poll interval plus a second

#[test]
fn new_key_works_within_poll_interval_plus_one_second() {
    let s = Setup::loaded(&[record("old")], 1);
    s.expect("old", 200, "loaded");
    s.expect("new", 401, "before publication");

    s.server.publish(&[record("old"), record("new")], 1, 2);
    let took = s.time_until(&key("new"), 200, Duration::from_secs(10));
    eprintln!("new key accepted {took:?} after publication (poll {POLL_MS} ms)");
    let took = took.expect("the new key never worked");
    assert!(took <= CHANGE_BOUND, "new key took {took:?} > {CHANGE_BOUND:?}");
    s.expect("new", 200, "after publication");
    s.expect("old", 200, "after publication");
    let reply = s.call(Proto::Http1, &key("new"));
    assert_eq!(reply.body, common::UPSTREAM_BODY);
    let forwarded = s.upstream.requests().pop().unwrap();
    assert_eq!(forwarded.header("x-api-key-id").as_deref(), Some("new"));
    assert_eq!(forwarded.header("x-org-id").as_deref(), Some("org_42"));
    assert!(!forwarded.has_header("authorization"));
}

#[test]
fn revoked_key_is_refused_within_poll_interval_plus_one_second() {
    let s = Setup::loaded(&[record("gone"), record("stays")], 1);
    s.expect("gone", 200, "loaded");

    s.server.publish(&[revoked("gone"), record("stays")], 1, 2);
    let took = s.time_until(&key("gone"), 401, Duration::from_secs(10));
    eprintln!("revoked key refused {took:?} after publication (poll {POLL_MS} ms)");
    let took = took.expect("the revoked key kept working");
    assert!(took <= CHANGE_BOUND, "revocation took {took:?} > {CHANGE_BOUND:?}");
    for proto in Proto::ALL {
        let reply = s.call(proto, &key("gone"));
        assert_eq!(reply.status, 401);
        assert_eq!(
            serde_json::from_str::<Value>(&reply.body).unwrap(),
            json!({"error": "invalid_api_key", "message": "The API key is invalid or has been revoked."})
        );
    }
    s.expect("stays", 200, "after revocation");
    s.upstream.clear();
    s.call(Proto::Http2, &key("gone"));
    assert!(s.upstream.requests().is_empty(), "a revoked key reached the upstream");
}

#[test]
fn removed_key_is_refused_within_poll_interval_plus_one_second() {
    let s = Setup::loaded(&[record("gone"), record("stays")], 1);
    s.expect("gone", 200, "loaded");
    assert_eq!(s.stat("keys"), Some(2));

    s.server.publish(&[record("stays")], 1, 2);
    let took = s.time_until(&key("gone"), 401, Duration::from_secs(10));
    eprintln!("removed key refused {took:?} after publication (poll {POLL_MS} ms)");
    let took = took.expect("the removed key kept working");
    assert!(took <= CHANGE_BOUND, "removal took {took:?} > {CHANGE_BOUND:?}");
    s.expect("gone", 401, "after removal");
    s.expect("stays", 200, "after removal");
    s.wait_loaded(2, Duration::from_secs(2));
    assert_eq!(s.stat("keys"), Some(1));
}

// ---------------------------------------------------------------------------------------------
// A misbehaving endpoint keeps the last good set serving

/// The keys of a last-known-good scenario: `a` is revoked and `c` added by the change, `b` stays;
/// each in a 1-digit shard of its own.
struct Change {
    a: String,
    b: String,
    c: String,
    /// The change, laid out: version 2.
    publication: Publication,
}

impl Change {
    fn new() -> Change {
        let ids = ids_in_distinct_shards("lkg", 3);
        let (a, b, c) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
        let publication = Publication::new(&[revoked(&a), record(&b), record(&c)], 1, 2);
        Change { a, b, c, publication }
    }

    fn prefix(id: &str) -> String {
        hash(&key(id))[..1].to_string()
    }

    /// Where the server serves the shard holding `id`.
    fn shard_path(id: &str) -> String {
        format!("{KEYSET_DIR}shards/{}.json", Change::prefix(id))
    }
}

/// Loads {a, b} (version 1); lets `inject` publish the change through a faulty channel; checks
/// that over at least two failed syncs a still works, c is still unknown and the version stays
/// 1; lets `heal` fix the channel; checks the change then shows within [`RECOVERY_BOUND`].
fn last_good_set_survives(
    opts: SetupOptions,
    inject: impl FnOnce(&Setup, &Change),
    heal: impl FnOnce(&Setup, &Change),
) {
    let change = Change::new();
    let s = Setup::loaded_with(&[record(&change.a), record(&change.b)], 1, opts);
    s.expect(&change.a, 200, "loaded");
    s.expect(&change.c, 401, "loaded");
    let failures = s.failures();

    inject(&s, &change);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut checks = 0;
    // Successful syncs (304s included) counted once the first failure is: none may follow.
    let mut syncs_after_first_failure = None;
    while s.failures() < failures + 2 {
        if syncs_after_first_failure.is_none() && s.failures() > failures {
            syncs_after_first_failure = s.stat("syncs");
        }
        assert!(
            Instant::now() < deadline,
            "fewer than two failed syncs counted in 15 s (sync_failures {} → {})\nkeygate log:\n{}",
            failures,
            s.failures(),
            s.envoy.keygate_log()
        );
        let proto = Proto::ALL[checks % 2];
        assert_eq!(s.status(proto, &key(&change.a)), 200, "during the fault: key a over {proto:?}");
        assert_eq!(s.status(proto, &key(&change.c)), 401, "during the fault: key c over {proto:?}");
        assert_eq!(s.stat("version"), Some(1), "during the fault");
        checks += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    s.expect(&change.a, 200, "after two failed syncs");
    s.expect(&change.b, 200, "after two failed syncs");
    s.expect(&change.c, 401, "after two failed syncs");
    assert_eq!(s.stat("version"), Some(1));
    assert_eq!(s.stat("keys"), Some(2));
    if let Some(syncs) = syncs_after_first_failure {
        assert_eq!(s.stat("syncs"), Some(syncs), "a sync counted as good while the endpoint misbehaved");
    }

    heal(&s, &change);
    let took = s.time_until(&key(&change.c), 200, RECOVERY_BOUND);
    eprintln!("recovered {took:?} after the endpoint behaved again");
    assert!(took.is_some(), "the change did not show within {RECOVERY_BOUND:?} of the endpoint behaving");
    s.expect(&change.a, 401, "after recovery");
    s.expect(&change.b, 200, "after recovery");
    s.expect(&change.c, 200, "after recovery");
    s.wait_loaded(2, Duration::from_secs(2));
    assert_eq!(s.stat("keys"), Some(3));
}

/// `inject` for a fault on the manifest path: set the fault, then publish the change.
fn manifest_fault(fault: Fault) -> impl FnOnce(&Setup, &Change) {
    move |s, change| {
        s.server.set_fault(MANIFEST_PATH, Some(fault));
        s.server.publish_built(&change.publication);
    }
}

/// `inject` for a fault on the shard that gains key c (the one revoking a is served well).
fn new_key_shard_fault(fault: Fault) -> impl FnOnce(&Setup, &Change) {
    move |s, change| {
        s.server.set_fault(&Change::shard_path(&change.c), Some(fault));
        s.server.publish_built(&change.publication);
    }
}

fn clear_faults(s: &Setup, _: &Change) {
    s.server.clear_faults();
}

/// `heal` for a tampered publication: publish the change as it should be.
fn publish_the_change(s: &Setup, change: &Change) {
    s.server.publish_built(&change.publication);
}

/// `inject` that publishes the change with the shard of key c replaced by `body(change)` (its
/// etag recomputed, so only the content is wrong).
fn new_key_shard_content(body: impl FnOnce(&Change) -> Vec<u8>) -> impl FnOnce(&Setup, &Change) {
    move |s, change| {
        let mut bad = change.publication.clone();
        bad.shard_mut(&Change::prefix(&change.c)).body = body(change);
        s.server.publish_built(&bad);
    }
}

#[test]
fn endpoint_down_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            s.server.go_down();
            s.server.publish_built(&change.publication);
        },
        |s, _| s.server.come_up(),
    );
}

#[test]
fn connection_closed_without_reply_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), manifest_fault(Fault::Down), clear_faults);
}

#[test]
fn manifest_slower_than_timeout_keeps_the_last_good_set() {
    let slow = Fault::Slow(Duration::from_millis(TIMEOUT_MS * 4));
    last_good_set_survives(SetupOptions::default(), manifest_fault(slow), clear_faults);
}

#[test]
fn shard_slower_than_timeout_keeps_the_last_good_set() {
    let slow = Fault::Slow(Duration::from_millis(TIMEOUT_MS * 4));
    last_good_set_survives(SetupOptions::default(), new_key_shard_fault(slow), clear_faults);
}

#[test]
fn manifest_5xx_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), manifest_fault(Fault::Status(503)), clear_faults);
}

#[test]
fn shard_5xx_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), new_key_shard_fault(Fault::Status(500)), clear_faults);
}

#[test]
fn manifest_404_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            s.server.publish_built(&change.publication);
            s.server.remove(MANIFEST_PATH);
        },
        publish_the_change,
    );
}

#[test]
fn html_manifest_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), manifest_fault(Fault::Html), clear_faults);
}

#[test]
fn html_shard_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), new_key_shard_fault(Fault::Html), clear_faults);
}

#[test]
fn truncated_manifest_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), manifest_fault(Fault::Truncated), clear_faults);
}

#[test]
fn truncated_shard_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), new_key_shard_fault(Fault::Truncated), clear_faults);
}

#[test]
fn shard_cut_off_mid_body_keeps_the_last_good_set() {
    last_good_set_survives(SetupOptions::default(), new_key_shard_fault(Fault::CutOff), clear_faults);
}

#[test]
fn wrong_shaped_manifest_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            s.server.publish_built(&change.publication);
            // Valid JSON, wrong shape: shards as a map of prefix to path.
            let paths: BTreeMap<String, String> =
                change.publication.shards.iter().map(|sh| (sh.prefix.clone(), sh.path.clone())).collect();
            s.server.put(MANIFEST_PATH, json!({"version": "2", "shards": paths}).to_string());
        },
        publish_the_change,
    );
}

#[test]
fn manifest_missing_a_prefix_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            s.server.publish_built(&change.publication);
            // 15 of the 16 shards: prefix "f" is covered by nothing.
            let mut manifest = change.publication.manifest();
            manifest["shards"].as_array_mut().unwrap().pop();
            s.server.put(MANIFEST_PATH, manifest.to_string());
        },
        publish_the_change,
    );
}

#[test]
fn wrong_shaped_shard_keeps_the_last_good_set() {
    let body = |_: &Change| br#"{"keys": {"hash": "not a list"}}"#.to_vec();
    last_good_set_survives(SetupOptions::default(), new_key_shard_content(body), publish_the_change);
}

#[test]
fn invalid_record_in_shard_keeps_the_last_good_set() {
    // Key c's record without its `org`.
    let body = |change: &Change| {
        let mut broken = record(&change.c);
        broken.as_object_mut().unwrap().remove("org");
        shard_body(&[broken])
    };
    last_good_set_survives(SetupOptions::default(), new_key_shard_content(body), publish_the_change);
}

#[test]
fn shard_not_matching_its_etag_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            // The manifest names the right content; the server sends other (valid) content.
            let mut bad = change.publication.clone();
            let shard = bad.shard_mut(&Change::prefix(&change.c));
            shard.etag_override = Some(shard.etag());
            shard.body = shard_body(&[record(&change.c), record("intruder")]);
            s.server.publish_built(&bad);
        },
        publish_the_change,
    );
}

#[test]
fn key_in_the_wrong_shard_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            // Key c listed in key b's shard (etag consistent), its own shard left empty.
            let mut bad = change.publication.clone();
            bad.shard_mut(&Change::prefix(&change.c)).body = shard_body(&[]);
            bad.shard_mut(&Change::prefix(&change.b)).body = shard_body(&[record(&change.b), record(&change.c)]);
            s.server.publish_built(&bad);
        },
        publish_the_change,
    );
}

#[test]
fn duplicate_hash_keeps_the_last_good_set() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            // Key c twice (two ids) in its own shard. The same hash in two shards would also put
            // one copy in a shard whose prefix it lacks: key_in_the_wrong_shard covers that.
            let mut twin = record(&change.c);
            twin["id"] = json!("twin");
            let mut bad = change.publication.clone();
            bad.shard_mut(&Change::prefix(&change.c)).body = shard_body(&[record(&change.c), twin]);
            s.server.publish_built(&bad);
        },
        publish_the_change,
    );
}

#[test]
fn hash_also_inline_keeps_the_last_good_set() {
    let opts = SetupOptions { inline: vec![record("inline")], ..SetupOptions::default() };
    last_good_set_survives(
        opts,
        |s, change| {
            // The change also lists the inline key: the README says the sync is refused.
            let mut bad = change.publication.clone();
            let prefix = hash(&key("inline"))[..1].to_string();
            let shard = bad.shard_mut(&prefix);
            let mut keys: Value = serde_json::from_slice(&shard.body).unwrap();
            keys["keys"].as_array_mut().unwrap().push(record("inline"));
            shard.body = serde_json::to_vec(&keys).unwrap();
            s.server.publish_built(&bad);
            s.expect("inline", 200, "inline key while the sync is refused");
        },
        publish_the_change,
    );
}

// ---------------------------------------------------------------------------------------------
// Cold start and inline keys

/// The 503 body and headers of `key_set_unavailable` with the default errors.
fn assert_key_set_unavailable(reply: &Response, context: &str) {
    assert_eq!(reply.status, 503, "{context}: {reply:?}");
    assert_eq!(reply.header("content-type"), Some("application/json"), "{context}");
    let body: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{context}: {e}: {reply:?}"));
    assert_eq!(body["error"], "key_set_unavailable", "{context}: {body}");
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "{context}: {body}");
    assert_eq!(body.as_object().unwrap().len(), 2, "{context}: {body}");
}

#[test]
fn cold_start_with_endpoint_down_is_503_key_set_unavailable_then_recovers() {
    let server = KeySetServer::start_down();
    server.publish(&[record("live")], 1, 5);
    let s = Setup::start(server, SetupOptions::default());
    for proto in Proto::ALL {
        assert_key_set_unavailable(&s.call(proto, &key("live")), &format!("{proto:?}, endpoint down"));
        assert_key_set_unavailable(&s.call(proto, &key("unknown")), &format!("{proto:?}, unknown key"));
    }
    assert!(s.upstream.requests().is_empty(), "a request reached the upstream before any key set loaded");
    // Let a few syncs fail (and the backoff grow) before the endpoint comes up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.failures() < 2 {
        assert!(Instant::now() < deadline, "no failed sync counted in 10 s\n{}", s.envoy.keygate_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_key_set_unavailable(&s.call(Proto::Http1, &key("live")), "still down");
    assert_eq!(s.envoy.keygate_stat("keygate.denied.key_set_unavailable"), Some(5));

    s.server.come_up();
    let took = s.time_until(&key("live"), 200, RECOVERY_BOUND);
    eprintln!("cold start: key accepted {took:?} after the endpoint came up");
    assert!(took.is_some(), "the key did not work within {RECOVERY_BOUND:?} of the endpoint coming up");
    s.expect("live", 200, "after the endpoint came up");
    s.expect("unknown", 401, "after the endpoint came up");
    s.wait_loaded(5, Duration::from_secs(2));
}

#[test]
fn key_set_unavailable_reply_can_be_overridden() {
    let errors = json!({"key_set_unavailable": {"status": 502, "code": "keys_loading",
                                                 "message": "Try again in a moment."}});
    let opts = SetupOptions { errors: Some(errors), ..SetupOptions::default() };
    let s = Setup::start(KeySetServer::start_down(), opts);
    for proto in Proto::ALL {
        let reply = s.call(proto, &key("any"));
        assert_eq!(reply.status, 502, "{proto:?}: {reply:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&reply.body).unwrap(),
            json!({"error": "keys_loading", "message": "Try again in a moment."})
        );
    }
}

#[test]
fn inline_key_works_before_the_key_set_has_loaded() {
    let opts = SetupOptions { inline: vec![record("breakglass")], ..SetupOptions::default() };
    let s = Setup::start(KeySetServer::start_down(), opts);
    s.expect("breakglass", 200, "endpoint down");
    let forwarded = s.upstream.requests().pop().unwrap();
    assert_eq!(forwarded.header("x-api-key-id").as_deref(), Some("breakglass"));
    for proto in Proto::ALL {
        assert_key_set_unavailable(&s.call(proto, &key("other")), &format!("{proto:?}, key not inline"));
        // What needs no key set is still decided: no key at all, and a malformed key.
        let reply = get(s.envoy.port(), proto, PATH, &[]);
        assert_eq!((reply.status, reply.body.contains("missing_api_key")), (401, true), "{reply:?}");
        let reply = get(s.envoy.port(), proto, PATH, &[("authorization", "Bearer pk_test_123")]);
        assert_eq!((reply.status, reply.body.contains("invalid_api_key")), (401, true), "{reply:?}");
    }
}

#[test]
fn inline_key_keeps_working_alongside_a_loaded_key_set() {
    let opts = SetupOptions { inline: vec![record("breakglass")], ..SetupOptions::default() };
    let s = Setup::loaded_with(&[record("live")], 3, opts);
    s.expect("breakglass", 200, "loaded");
    s.expect("live", 200, "loaded");
    s.expect("unknown", 401, "loaded");
    assert_eq!(s.stat("keys"), Some(1), "the key_set.keys gauge counts the shared set only");
}

// ---------------------------------------------------------------------------------------------
// One poller per Envoy, conditional requests, stats

#[test]
fn four_workers_fetch_the_manifest_once_per_poll() {
    let opts = SetupOptions { concurrency: 4, ..SetupOptions::default() };
    let s = Setup::loaded_with(&[record("live")], 1, opts);
    // Every worker answers from the shared set: many fresh connections land on every worker.
    for i in 0..24 {
        let proto = Proto::ALL[i % 2];
        assert_eq!(s.status(proto, &key("live")), 200, "request {i} over {proto:?}");
        assert_eq!(s.status(proto, &key("unknown")), 401, "request {i} over {proto:?}");
    }
    s.server.clear_requests();
    let window = Duration::from_secs(5);
    std::thread::sleep(window);
    let fetches = s.server.count(MANIFEST_PATH);
    let expected = window.as_millis() as usize / POLL_MS as usize; // 10
    eprintln!(
        "--concurrency 4: {fetches} manifest fetches in {window:?} (poll {POLL_MS} ms, expected about {expected})"
    );
    assert!(
        fetches >= expected / 2 && fetches <= expected * 3 / 2,
        "{fetches} manifest fetches in {window:?} with poll {POLL_MS} ms and 4 workers: expected about {expected}"
    );
    // Never two fetches of the manifest at (almost) the same time, as four pollers would make.
    let times: Vec<Instant> = s.server.requests_for(MANIFEST_PATH).iter().map(|r| r.at).collect();
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(POLL_MS / 2), "two manifest fetches {gap:?} apart: {times:?}");
    }
}

#[test]
fn unchanged_manifest_is_answered_304_and_no_shard_is_refetched() {
    let records: Vec<Value> = (0..40).map(|i| record(&format!("k{i:02}"))).collect();
    let s = Setup::loaded(&records, 1);
    // The first load fetched every shard once.
    let shard_paths: Vec<String> = (0..16).map(|n| format!("{KEYSET_DIR}shards/{n:x}.json")).collect();
    for path in &shard_paths {
        assert_eq!(s.server.count(path), 1, "{path}");
    }
    let etag = format!("\"{}\"", sha256_hex(&s.server.body(MANIFEST_PATH).unwrap()));
    let seen = s.server.count(MANIFEST_PATH);
    assert!(s.server.wait_for_requests(MANIFEST_PATH, seen + 3, Duration::from_millis(3 * POLL_MS + 2000)));

    let later = &s.server.requests_for(MANIFEST_PATH)[seen..];
    for r in later {
        assert_eq!(r.method, "GET");
        assert_eq!(r.header("if-none-match"), Some(etag.as_str()), "{r:?}");
        assert_eq!(r.status, Some(304), "{r:?}");
    }
    for path in &shard_paths {
        assert_eq!(s.server.count(path), 1, "{path} fetched again with nothing changed");
    }
    assert_eq!(s.stat("version"), Some(1));
    s.expect("k07", 200, "unchanged");
}

#[test]
fn one_revocation_refetches_only_its_shard() {
    let records: Vec<Value> = (0..40).map(|i| record(&format!("k{i:02}"))).collect();
    let s = Setup::loaded(&records, 1);
    let mut changed = records.clone();
    changed[7] = revoked("k07");
    let publication = s.server.publish(&changed, 1, 2);
    let took = s.time_until(&key("k07"), 401, Duration::from_secs(10));
    assert!(took.is_some_and(|t| t <= CHANGE_BOUND), "revocation took {took:?}");
    s.wait_loaded(2, Duration::from_secs(2));

    let target = publication.shard_of(&hash(&key("k07"))).served_path();
    for shard in &publication.shards {
        let path = shard.served_path();
        let want = if path == target { 2 } else { 1 };
        assert_eq!(s.server.count(&path), want, "{path} (the revocation changed {target})");
    }
    s.expect("k08", 200, "after the revocation");
    assert_eq!(s.stat("keys"), Some(40));
}

#[test]
fn server_without_etag_support_still_syncs() {
    let server = KeySetServer::start();
    server.set_etags(false);
    server.publish(&[record("one")], 1, 1);
    let s = Setup::start(server, SetupOptions::default());
    s.wait_loaded(1, Duration::from_secs(10));
    s.expect("one", 200, "loaded");
    let seen = s.server.count(MANIFEST_PATH);
    assert!(s.server.wait_for_requests(MANIFEST_PATH, seen + 2, Duration::from_millis(2 * POLL_MS + 2000)));
    for r in s.server.requests_for(MANIFEST_PATH) {
        assert_eq!(r.header("if-none-match"), None, "If-None-Match sent to a server that gave no ETag: {r:?}");
        assert_eq!(r.status, Some(200));
    }
    s.server.publish(&[record("one"), record("two")], 1, 2);
    let took = s.time_until(&key("two"), 200, Duration::from_secs(10));
    assert!(took.is_some_and(|t| t <= CHANGE_BOUND), "took {took:?}");
}

#[test]
fn stats_report_version_key_count_and_sync_age() {
    let records: Vec<Value> = (0..5).map(|i| record(&format!("s{i}"))).collect();
    let s = Setup::loaded(&records, 1732355000);
    assert_eq!(s.stat("version"), Some(1732355000));
    assert_eq!(s.stat("keys"), Some(5));
    assert!(s.stat("syncs").unwrap() >= 1);
    assert_eq!(s.stat("sync_failures"), Some(0));
    let age = s.stat("seconds_since_sync").unwrap();
    assert!(age <= 2, "seconds_since_sync {age} right after a sync");

    // Every request the endpoint saw: GET, the configured authority, paths under /keyset/.
    for r in s.server.requests() {
        assert_eq!(r.method, "GET", "{r:?}");
        assert_eq!(r.header("host"), Some("keys.internal"), "{r:?}");
        assert!(r.path.starts_with(KEYSET_DIR), "{r:?}");
    }

    s.server.publish(&records[..3], 1, 1732355060);
    s.wait_loaded(1732355060, CHANGE_BOUND + Duration::from_secs(1));
    assert_eq!(s.stat("keys"), Some(3));
    assert!(s.stat("syncs").unwrap() >= 2);

    // The age grows while the endpoint fails, and the failures are counted.
    s.server.set_global_fault(Some(Fault::Status(503)));
    std::thread::sleep(Duration::from_millis(3500));
    let age = s.stat("seconds_since_sync").unwrap();
    assert!((2..=6).contains(&age), "seconds_since_sync {age} after 3.5 s of failures");
    assert!(s.failures() >= 2, "sync_failures {}", s.failures());
    assert_eq!(s.stat("version"), Some(1732355060));
}

#[test]
fn text_version_is_accepted() {
    let s = Setup::loaded(&[record("one")], 3);
    s.server.publish(&[record("one"), record("two")], 1, "2026-11-23.b");
    let took = s.time_until(&key("two"), 200, Duration::from_secs(10));
    assert!(took.is_some_and(|t| t <= CHANGE_BOUND), "took {took:?}");
    s.expect("one", 200, "text version");
    assert_eq!(s.stat("keys"), Some(2));
}

#[test]
fn resharding_drops_the_keys_left_out() {
    // 16 shards, then one: the keys the new layout leaves out must stop working.
    let records: Vec<Value> = (0..8).map(|i| record(&format!("r{i}"))).collect();
    let s = Setup::loaded(&records, 1);
    s.server.publish(&records[..4], 0, 2);
    s.wait_loaded(2, CHANGE_BOUND + Duration::from_secs(1));
    for i in 0..8 {
        s.expect(&format!("r{i}"), if i < 4 { 200 } else { 401 }, "after resharding to one shard");
    }
    assert_eq!(s.stat("keys"), Some(4));
    // And back to 16 shards, with r7 back in.
    let mut back = records[..4].to_vec();
    back.push(record("r7"));
    s.server.publish(&back, 1, 3);
    s.wait_loaded(3, CHANGE_BOUND + Duration::from_secs(1));
    for i in 0..8 {
        s.expect(&format!("r{i}"), if i < 4 || i == 7 { 200 } else { 401 }, "after resharding to 16 shards");
    }
    assert_eq!(s.stat("keys"), Some(5));
}

// ---------------------------------------------------------------------------------------------
// Hostile bodies: size limits, nesting, error paths linear in the input

/// The slowest answers seen while a hostile body was being served.
#[derive(Debug, Default)]
struct Slowest {
    inline_key: Duration,
    public_route: Duration,
    ready: Duration,
    rounds: usize,
}

/// For `window`, calls with the inline key `breakglass` (200), a public route (200) and admin
/// `/ready` (LIVE) in turn, alternating HTTP/1.1 and HTTP/2; each must answer within one second.
fn answers_within_a_second_for(s: &Setup, window: Duration) -> Slowest {
    let bound = Duration::from_secs(1);
    let mut slowest = Slowest::default();
    let end = Instant::now() + window;
    while Instant::now() < end {
        let proto = Proto::ALL[slowest.rounds % 2];
        let t = Instant::now();
        let reply = s.call(proto, &key("breakglass"));
        let took = t.elapsed();
        assert_eq!(reply.status, 200, "inline key over {proto:?} during the attack: {reply:?}");
        assert!(took < bound, "inline key over {proto:?} took {took:?}");
        slowest.inline_key = slowest.inline_key.max(took);

        let t = Instant::now();
        let reply = get(s.envoy.port(), proto, "/healthz", &[]);
        let took = t.elapsed();
        assert_eq!(reply.status, 200, "public route over {proto:?} during the attack: {reply:?}");
        assert!(took < bound, "public route over {proto:?} took {took:?}");
        slowest.public_route = slowest.public_route.max(took);

        let t = Instant::now();
        let reply = s.envoy.admin_get("/ready");
        let took = t.elapsed();
        assert_eq!((reply.status, reply.body.trim()), (200, "LIVE"), "admin /ready during the attack");
        assert!(took < bound, "admin /ready took {took:?}");
        slowest.ready = slowest.ready.max(took);
        slowest.rounds += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    slowest
}

/// Two workers (so worker and main-thread VMs both take the lease), a break-glass inline key and
/// a public route, loaded with key `live` (version 1).
fn hostile_setup(key_set: Value) -> Setup {
    let opts = SetupOptions {
        inline: vec![record("breakglass")],
        concurrency: 2,
        routes: Some(json!([{"path": "/healthz", "public": true}, {"path": "/**"}])),
        key_set,
        ..SetupOptions::default()
    };
    Setup::loaded_with(&[record("live")], 1, opts)
}

/// While the endpoint serves a hostile body (installed by `attack`), for 8 s: keygate answers
/// within a second, the set that serves stays, each failure counts and the backoff grows (fewer
/// manifest fetches than one per poll), and keygate's log says `why`. Then the endpoint behaves
/// and the next version loads.
fn hostile_body_changes_nothing(s: &Setup, attack: impl FnOnce(&Setup), why: &str) {
    let failures = s.failures();
    let fetches = s.server.count(MANIFEST_PATH);
    attack(s);
    let window = Duration::from_secs(8);
    let slowest = answers_within_a_second_for(s, window);
    let fetched = s.server.count(MANIFEST_PATH) - fetches;
    eprintln!("during the attack: {slowest:?}; {fetched} manifest fetches in {window:?}");
    assert!(s.wait_for_keygate_log(why), "keygate's log never said {why:?}:\n{}", s.envoy.keygate_log());
    let failed = s.failures() - failures;
    assert!(failed >= 2, "only {failed} failed syncs counted");
    // A poll every 500 ms would be 16; the backoff doubles up to 5 s: 500 ms, 1, 2, 4, 5 s.
    assert!(fetched <= 7, "{fetched} manifest fetches in {window:?}: the backoff did not grow");
    assert_eq!(s.stat("version"), Some(1));
    s.expect("live", 200, "during the attack");

    s.server.publish(&[record("live"), record("next")], 1, 2);
    s.wait_loaded(2, RECOVERY_BOUND);
    s.expect("next", 200, "after the attack");
}

impl Setup {
    fn wait_for_keygate_log(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(3);
        while !self.envoy.keygate_log().contains(needle) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        true
    }
}

#[test]
fn a_2_mib_nested_manifest_read_in_full_leaves_requests_and_ready_under_a_second() {
    // The limit raised past the body, so that it is read and parsed.
    let s = hostile_setup(json!({"max_manifest_bytes": 8 << 20}));
    let why = "manifest: version[0][0][0][0][0][0]: nested more than 8 levels deep";
    hostile_body_changes_nothing(
        &s,
        |s| s.server.put(MANIFEST_PATH, keygate_core::fuzzing::nested_manifest(2 << 20)),
        why,
    );
}

#[test]
fn a_manifest_past_max_manifest_bytes_is_refused_unread() {
    let s = hostile_setup(json!({"max_manifest_bytes": 1 << 20}));
    let body = keygate_core::fuzzing::nested_manifest(2 << 20);
    let why = format!("manifest: the body is {} bytes, more than key_set.max_manifest_bytes (1048576)", body.len());
    hostile_body_changes_nothing(&s, |s| s.server.put(MANIFEST_PATH, body), &why);
}

#[test]
fn a_shard_with_megabytes_of_arrays_under_expires_at_is_refused_at_once() {
    let s = hostile_setup(json!({}));
    let id = "exp";
    let attack = |s: &Setup| {
        // 2 MiB of arrays 100 deep under one record's `expires_at` (its etag right).
        let mut body =
            format!(r#"{{"keys": [{{"id": "{id}", "hash": "{}", "org": "o", "expires_at": ["#, hash(&key(id)))
                .into_bytes();
        let unit = format!("{}{},", "[".repeat(100), "]".repeat(100));
        while body.len() < 2 << 20 {
            body.extend_from_slice(unit.as_bytes());
        }
        body.extend_from_slice(b"[]]}]}");
        let mut publication = Publication::new(&[record("live"), record(id)], 1, 2);
        let prefix = hash(&key(id))[..1].to_string();
        publication.shard_mut(&prefix).body = body;
        s.server.publish_built(&publication);
    };
    let prefix = hash(&key(id))[..1].to_string();
    let why = format!(
        "shard \"{prefix}\" (shards/{prefix}.json): keys[0].expires_at[0][0][0][0]: nested more than 8 levels deep"
    );
    hostile_body_changes_nothing(&s, attack, &why);
}

// ---------------------------------------------------------------------------------------------
// A set that lacks a key retires it, whatever happened before

#[test]
fn a_key_from_a_failed_first_load_is_retired_by_a_set_of_another_width() {
    let ids = ids_in_distinct_shards("fl", 2);
    let (partial, blocked) = (ids[0].clone(), ids[1].clone());
    let server = KeySetServer::start();
    server.publish(&[record(&partial), record(&blocked)], 1, 1);
    // The first load fails part-way, every time: one shard answers 503.
    server.set_fault(&format!("{KEYSET_DIR}shards/{}.json", &hash(&key(&blocked))[..1]), Some(Fault::Status(503)));
    let s = Setup::start(server, SetupOptions::default());
    let took = s.time_until(&key(&partial), 200, Duration::from_secs(15));
    assert!(took.is_some(), "the shard of the first load that did arrive was never written\n{}", s.envoy.keygate_log());
    assert_eq!(s.stat("version").unwrap_or(0), 0, "nothing counts as loaded");
    assert!(s.failures() >= 1);

    // The next publication: one shard (another width), without that key.
    s.server.clear_faults();
    s.server.publish(&[record(&blocked)], 0, 2);
    s.wait_loaded(2, RECOVERY_BOUND);
    s.expect(&partial, 401, "a key the loaded set lacks");
    s.expect(&blocked, 200, "the loaded set");
    assert_eq!(s.stat("keys"), Some(1));
}

// ---------------------------------------------------------------------------------------------
// Record ids are unique across the whole set

/// The change of [`Change`] with key c's record renamed to `id`.
fn with_c_named(change: &Change, id: &str) -> Publication {
    let mut c = record(&change.c);
    c["id"] = json!(id);
    let mut bad = change.publication.clone();
    bad.shard_mut(&Change::prefix(&change.c)).body = shard_body(&[c]);
    bad
}

#[test]
fn an_id_in_two_shards_keeps_the_last_good_set_and_names_both() {
    last_good_set_survives(
        SetupOptions::default(),
        |s, change| {
            // Key c published under key b's id: the upstream would be told "b" for two keys.
            s.server.publish_built(&with_c_named(change, &change.b));
        },
        |s, change| {
            let (pc, pb) = (Change::prefix(&change.c), Change::prefix(&change.b));
            let why = format!(
                "shard \"{pc}\" (shards/{pc}.json): keys[0].id: \"{}\" is also shard \"{pb}\" keys[0].id",
                change.b
            );
            assert!(s.wait_for_keygate_log(&why), "no {why:?} in keygate's log:\n{}", s.envoy.keygate_log());
            s.server.publish_built(&change.publication);
        },
    );
}

#[test]
fn an_id_also_inline_keeps_the_last_good_set_and_names_both() {
    let opts = SetupOptions { inline: vec![record("inline")], ..SetupOptions::default() };
    last_good_set_survives(
        opts,
        |s, change| {
            s.server.publish_built(&with_c_named(change, "inline"));
            s.expect("inline", 200, "inline key while the sync is refused");
        },
        |s, change| {
            let pc = Change::prefix(&change.c);
            let why = format!(
                "shard \"{pc}\" (shards/{pc}.json): keys[0].id: \"inline\" is also the id of an inline key (the configuration's `keys`)"
            );
            assert!(s.wait_for_keygate_log(&why), "no {why:?} in keygate's log:\n{}", s.envoy.keygate_log());
            s.server.publish_built(&change.publication);
        },
    );
}

// ---------------------------------------------------------------------------------------------
// VMs numbered at the same moment

#[test]
fn eight_workers_starting_together_load_and_poll_as_one() {
    // Nine VMs (eight workers and the main thread) number themselves and race for the lease as
    // Envoy starts. Two with one number would both poll: every shard of the first load fetched
    // twice, manifest fetches in pairs. (A race of microseconds: this guards, the unit test
    // two_vms_never_get_one_number_even_when_both_create_the_counter proves.)
    let records: Vec<Value> = (0..32).map(|i| record(&format!("n{i:02}"))).collect();
    let opts = SetupOptions { concurrency: 8, ..SetupOptions::default() };
    let s = Setup::loaded_with(&records, 1, opts);
    for n in 0..16 {
        let path = format!("{KEYSET_DIR}shards/{n:x}.json");
        assert_eq!(s.server.count(&path), 1, "{path} fetched more than once by the first load");
    }
    s.server.clear_requests();
    std::thread::sleep(Duration::from_secs(4));
    let times: Vec<Instant> = s.server.requests_for(MANIFEST_PATH).iter().map(|r| r.at).collect();
    assert!((4..=12).contains(&times.len()), "{} manifest fetches in 4 s at a 500 ms poll", times.len());
    for pair in times.windows(2) {
        let gap = pair[1].duration_since(pair[0]);
        assert!(gap >= Duration::from_millis(POLL_MS / 2), "two manifest fetches {gap:?} apart: {times:?}");
    }
    s.expect("n07", 200, "loaded by eight workers");
}

// ---------------------------------------------------------------------------------------------
// Clock steps

/// Envoy's monotonic clock in milliseconds: the system's CLOCK_MONOTONIC, which Envoy's steady
/// clock (and so keygate's schedule) reads.
fn monotonic_ms() -> i64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the valid, aligned `ts`.
    assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) }, 0);
    ts.tv_sec * 1_000 + ts.tv_nsec / 1_000_000
}

#[test]
fn a_lease_schedule_and_sync_time_an_hour_ahead_are_not_waited_out() {
    // What a VM finds in shared data after its clock stepped back an hour: a lease held by another
    // VM, a poll due and a last sync all an hour ahead. Planted through the probe build.
    if !Host::Wasm.tested_or_say("a lease planted an hour ahead", "the native module has no shared data to plant in") {
        return;
    }
    let opts = SetupOptions { probe: true, ..SetupOptions::default() };
    let s = Setup::loaded_with(&[record("a"), record("b")], 1, opts);
    let raw = serde_json::from_value(json!({"cluster": "keyset", "authority": "keys.internal", "path": MANIFEST_PATH}));
    let config = keygate_core::live::KeySetConfig::compile(&raw.unwrap()).unwrap();
    let hour = 3_600_000;
    let ahead = monotonic_ms() + hour;
    let lease = keygate_core::live::Lease { owner: u32::MAX - 1, expires_ms: ahead, next_due_ms: ahead, failures: 0 };
    let state = keygate_core::live::SyncState {
        version: "1".into(),
        keys: 2,
        synced_ms: ahead,
        manifest_etag: None,
        width: Some(1),
    };
    for (entry, value) in [(config.lease_entry(), lease.encode()), (config.state_entry(), state.encode())] {
        let planted = format!("{entry} {}", hex::encode(value));
        get(s.envoy.port(), Proto::Http1, PATH, &[("x-keygate-probe-shared", &planted)]);
    }

    s.server.publish(&[revoked("a"), record("b")], 1, 2);
    let took = s.time_until(&key("a"), 401, Duration::from_secs(10));
    eprintln!("with the lease and the schedule an hour ahead, a revocation took {took:?}");
    assert!(took.is_some_and(|t| t <= CHANGE_BOUND), "revocation took {took:?}: the VMs waited out the hour");
    s.wait_loaded(2, Duration::from_secs(2));
    s.server.set_global_fault(Some(Fault::Status(503)));
    std::thread::sleep(Duration::from_millis(3_500));
    let age = s.stat("seconds_since_sync").unwrap();
    assert!((2..=6).contains(&age), "seconds_since_sync {age} after 3.5 s of failures");
    assert!(s.failures() >= 2, "sync_failures {}", s.failures());
    s.expect("b", 200, "after the planted hour");
}

#[test]
fn a_vm_reloaded_after_a_crash_gets_a_number_no_live_vm_has() {
    // Envoy reloads a crashed VM (FAIL_RELOAD), and the new VM numbers itself while the others
    // run. Planted first: the VM counter set back, which is what a VM creating the counter at the
    // same moment as another's increment leaves. A number handed out twice makes two VMs hold the
    // lease as one: both poll. Counting, the main thread's VMs and the worker's had 1 to 3; the
    // reloaded worker would get 1, then 2: a main thread VM's number.
    if !Host::Wasm.tested_or_say("a VM reloaded after a crash", "a native module has no VMs, and no failure policy") {
        return;
    }
    let opts = SetupOptions { probe: true, failure_policy: "FAIL_RELOAD", ..SetupOptions::default() };
    let s = Setup::loaded_with(&[record("live")], 1, opts);
    let raw = serde_json::from_value(json!({"cluster": "keyset", "authority": "keys.internal", "path": MANIFEST_PATH}));
    let config = keygate_core::live::KeySetConfig::compile(&raw.unwrap()).unwrap();
    for count in ["0", "1"] {
        let planted = format!("{} {}", config.vmseq_entry(), hex::encode(count));
        get(s.envoy.port(), Proto::Http1, PATH, &[("x-keygate-probe-shared", &planted)]);
        let crashed = get(s.envoy.port(), Proto::Http1, PATH, &[("x-keygate-panic-probe", "1")]);
        assert_ne!(crashed.status, 200, "the crashing request was let through");
        // The next requests are served by a fresh VM, which numbered itself.
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.status(Proto::Http1, &key("live")) != 200 {
            assert!(Instant::now() < deadline, "no fresh VM served within 10 s\n{}", s.envoy.keygate_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Two holders share the schedule, so they poll in turn; they show once a poll lasts:
        // while one waits for a slow manifest, the other finds the poll due and starts its own.
        s.server.set_fault(MANIFEST_PATH, Some(Fault::Slow(Duration::from_millis(250))));
        std::thread::sleep(Duration::from_secs(1));
        s.server.clear_requests();
        std::thread::sleep(Duration::from_secs(4));
        s.server.clear_faults();
        let times: Vec<Instant> = s.server.requests_for(MANIFEST_PATH).iter().map(|r| r.at).collect();
        eprintln!("counter set to {count}, a VM reloaded: {} manifest fetches in 4 s", times.len());
        assert!((3..=8).contains(&times.len()), "{} manifest fetches in 4 s at a 500 ms poll", times.len());
        for pair in times.windows(2) {
            let gap = pair[1].duration_since(pair[0]);
            // One poller: 250 ms for the answer, then 500 ms to the next poll.
            assert!(gap >= Duration::from_millis(POLL_MS), "two manifest fetches {gap:?} apart: {times:?}");
        }
        s.expect("live", 200, "after the reload");
    }
}
