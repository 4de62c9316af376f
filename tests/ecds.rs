//! Key distribution through the plugin configuration (README "Key distribution", part 1): the
//! shipped `envoy/ecds/` example, an Envoy whose keygate filter comes from a file-based ECDS
//! source. Replacing that file by a rename swaps the key set in the running Envoy within a
//! second; an update keygate rejects leaves the previous key set serving, with no failed request
//! in between.
//!
//! The tests never touch the shipped files: each Envoy gets copies in its own directory, the
//! paths in `envoy.yaml` rewritten to point there, and a swap writes `keygate.yaml.tmp` there
//! and renames it over `keygate.yaml`.
//!
//! Envoy's behaviour, as observed (1.40):
//! - A file-based ECDS subscription needs `node.id` and `node.cluster`; the source file must
//!   exist at start-up. Without a `default_config` the listener is warmed with the file's
//!   configuration, so the first request already sees the key set.
//! - A rejected configuration (keygate's `on_configure` returns false: Envoy logs
//!   `keygate: invalid configuration: …`, then `Plugin keygate failed to load`; the native module
//!   refuses its configuration, and Envoy logs `Failed to initialize dynamic module`) counts
//!   `extension_config_discovery.http_filter.keygate.config_fail` and `update_rejected`, and the
//!   previous configuration keeps serving.
//! - If the very first configuration is rejected, Envoy still starts, and answers every request
//!   on that listener with its own `500` (empty body) until a valid file arrives: never open.
//!   That first valid file takes longer to apply than a swap (0.5 to 2 s against about 60 ms
//!   measured), as Envoy has no Wasm VM to reuse and compiles one.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::fs;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::envoy::{for_host_under_test, substitute_recipe, substitute_wasm, Host, INSTANCE_DIR_TOKEN};
use common::{get, repo_root, wasm_path, Envoy, EnvoyOptions, KeySetServer, Proto, Response, Upstream, MANIFEST_PATH};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};

/// The demo keys listed in envoy/ecds/keygate.yaml: A is valid, B revoked.
const KEY_A: &str = "sk_live_ecd5a001_6b1f0c2d9e8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c1d";
const KEY_B: &str = "sk_live_ecd5b002_0f1e2d3c4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0";
const UNKNOWN_KEY: &str = "sk_live_ecd5c003_ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
/// A route the demo configuration lets `venues:read` keys call.
const PATH: &str = "/v1/venues/v_7";
/// The ECDS stats of the `keygate` filter.
const ECDS_STATS: &str = "extension_config_discovery.http_filter.keygate";
const INVALID_CONFIGURATION: &str = "keygate: invalid configuration:";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

fn record(id: &str, key: &str) -> Value {
    json!({"id": id, "hash": hash(key), "org": "org_42", "scopes": ["venues:read"]})
}

/// A keygate plugin configuration shaped as the shipped one, with these keys.
fn plugin_config(keys: &[Value]) -> String {
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": keys,
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/**", "scopes": ["venues:read"]}
        ],
        "unmatched": "deny"
    })
    .to_string()
}

/// An ECDS file (a DiscoveryResponse, written as JSON, which Envoy reads as YAML) holding the
/// keygate filter with `configuration` as its plugin configuration text, everything else as in
/// the shipped envoy/ecds/keygate.yaml.
fn ecds_file(configuration: &str) -> String {
    let wasm = wasm_path();
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "keygate",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "keygate",
                "root_id": "keygate",
                "failure_policy": "FAIL_CLOSED",
                "vm_config": {"vm_id": "keygate", "runtime": "envoy.wasm.runtime.v8",
                              "code": {"local": {"filename": wasm}}},
                "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration}
            }
        }
    }]})
    .to_string()
}

fn shipped(name: &str) -> String {
    let path = repo_root().join("envoy/ecds").join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with `from` replaced by `to`; panics unless `from` appears exactly once.
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(text.matches(from).count(), 1, "expected `{from}` exactly once in envoy/ecds/envoy.yaml");
    text.replace(from, to)
}

/// The shipped envoy/ecds/envoy.yaml, ready for a test: recipe substitutions (ports, wasm,
/// addresses), and its ECDS file and watched directory moved to the instance directory.
fn envoy_yaml(upstream_port: u16) -> String {
    let text = substitute_recipe(&shipped("envoy.yaml"), upstream_port).unwrap();
    let text =
        replace_once(&text, "path: envoy/ecds/keygate.yaml", &format!("path: {INSTANCE_DIR_TOKEN}/keygate.yaml"));
    replace_once(
        &text,
        "watched_directory: { path: envoy/ecds }",
        &format!("watched_directory: {{ path: {INSTANCE_DIR_TOKEN} }}"),
    )
}

/// An upstream and the shipped ECDS example with `keygate_yaml` as its ECDS file.
fn start(keygate_yaml: &str) -> (Upstream, Envoy) {
    let upstream = Upstream::start();
    let envoy = Envoy::try_start_with_files(&envoy_yaml(upstream.port()), "yaml", 1, &[("keygate.yaml", keygate_yaml)])
        .unwrap_or_else(|log| {
            panic!("Envoy did not start on envoy/ecds/envoy.yaml:\n{}", common::envoy::tail(&log, 80))
        });
    (upstream, envoy)
}

/// Replaces the ECDS file atomically: write `keygate.yaml.tmp`, rename it over `keygate.yaml`.
fn swap(envoy: &Envoy, text: &str) -> Instant {
    let tmp = envoy.dir().join("keygate.yaml.tmp");
    fs::write(&tmp, for_host_under_test(text)).unwrap();
    let at = Instant::now();
    fs::rename(&tmp, envoy.dir().join("keygate.yaml")).unwrap();
    at
}

fn call(envoy: &Envoy, proto: Proto, key: &str) -> Response {
    get(envoy.port(), proto, PATH, &[("x-api-key", key)])
}

fn ecds_stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(&format!("{ECDS_STATS}.{name}")).unwrap_or_else(|| panic!("no stat {ECDS_STATS}.{name}"))
}

/// Calls with `key` every 50 ms, alternating HTTP/1.1 and HTTP/2, until the status is `want`;
/// returns how long after `since` that was, or `None` after `timeout`.
fn time_until(envoy: &Envoy, key: &str, want: u16, since: Instant, timeout: Duration) -> Option<Duration> {
    let mut protos = Proto::ALL.iter().cycle();
    loop {
        let proto = *protos.next().unwrap();
        if call(envoy, proto, key).status == want {
            return Some(since.elapsed());
        }
        if since.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Requests with one key, every few milliseconds, from a thread, alternating HTTP/1.1 and
/// HTTP/2; each status (or transport error, as 0) is kept in order.
struct Traffic {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(port: u16, key: &'static str) -> Traffic {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let (st, out) = (Arc::clone(&stop), Arc::clone(&statuses));
        let thread = std::thread::spawn(move || {
            let mut n = 0usize;
            while !st.load(Ordering::SeqCst) {
                let proto = Proto::ALL[n % 2];
                let status =
                    common::try_send(port, proto, "GET", PATH, &[("x-api-key", key)], b"").map_or(0, |r| r.status);
                out.lock().unwrap().push(status);
                n += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
        });
        Traffic { stop, statuses, thread: Some(thread) }
    }

    fn count(&self) -> usize {
        self.statuses.lock().unwrap().len()
    }

    /// Stops the thread; returns every status in order.
    fn finish(mut self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        std::mem::take(&mut *self.statuses.lock().unwrap())
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits until the traffic thread has made `n` more requests (so it ran across an event).
fn let_traffic_run(traffic: &Traffic, n: usize) {
    let target = traffic.count() + n;
    let deadline = Instant::now() + Duration::from_secs(10);
    while traffic.count() < target {
        assert!(Instant::now() < deadline, "the traffic thread stalled");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn count_of(log: &str, needle: &str) -> usize {
    log.matches(needle).count()
}

#[test]
fn shipped_ecds_example_serves_its_demo_keys() {
    let (upstream, envoy) = start(&substitute_wasm(&shipped("keygate.yaml")));
    for proto in Proto::ALL {
        upstream.clear();
        let reply = call(&envoy, proto, KEY_A);
        assert_eq!((reply.status, reply.body.as_str()), (200, common::UPSTREAM_BODY), "{proto:?}");
        let forwarded = upstream.single_request();
        assert_eq!(forwarded.header("x-api-key-id").as_deref(), Some("ecd5a001"));
        assert!(!forwarded.has_header("x-api-key"), "the key reached the upstream");

        upstream.clear();
        let reply = call(&envoy, proto, KEY_B);
        assert_eq!(reply.status, 401, "{proto:?}: revoked demo key: {reply:?}");
        assert_eq!(
            serde_json::from_str::<Value>(&reply.body).unwrap(),
            json!({"error": "invalid_api_key", "message": "The API key is invalid or has been revoked."})
        );
        assert_eq!(get(envoy.port(), proto, "/healthz", &[]).status, 200, "{proto:?}: public route");
        assert_eq!(get(envoy.port(), proto, "/v2/other", &[("x-api-key", KEY_A)]).status, 403, "{proto:?}: unmatched");
    }
    assert_eq!(ecds_stat(&envoy, "config_fail"), 0);
    assert_eq!(ecds_stat(&envoy, "update_success"), 1);
    assert_eq!(envoy.keygate_stat("keygate.keys"), Some(2));
}

#[test]
fn ecds_file_swap_takes_effect_within_one_second() {
    // Start with A only; swap in a set with B only.
    let (_upstream, envoy) = start(&ecds_file(&plugin_config(&[record("ecd5a001", KEY_A)])));
    for proto in Proto::ALL {
        assert_eq!(call(&envoy, proto, KEY_A).status, 200, "{proto:?}");
        assert_eq!(call(&envoy, proto, KEY_B).status, 401, "{proto:?}");
    }
    let successes = ecds_stat(&envoy, "update_success");

    let traffic = Traffic::start(envoy.port(), KEY_A);
    let_traffic_run(&traffic, 20);
    let swapped = swap(&envoy, &ecds_file(&plugin_config(&[record("ecd5b002", KEY_B)])));
    let took = time_until(&envoy, KEY_B, 200, swapped, Duration::from_secs(1));
    eprintln!("ECDS swap: the new key worked {took:?} after the rename");
    assert!(took.is_some(), "the swapped-in key did not work within 1 s of the rename\n{}", envoy.keygate_log());
    let_traffic_run(&traffic, 20);
    let statuses = traffic.finish();

    for proto in Proto::ALL {
        assert_eq!(call(&envoy, proto, KEY_A).status, 401, "{proto:?}: the removed key");
        assert_eq!(call(&envoy, proto, KEY_B).status, 200, "{proto:?}: the added key");
    }
    // Key A was accepted, then refused, and never anything else: no 5xx while the filter
    // configuration changed, no transport error, and no going back to the old set.
    let flip = statuses.iter().position(|&s| s != 200).expect("key A was never refused during the traffic");
    assert!(flip >= 20, "key A refused before the swap: {statuses:?}");
    assert!(statuses[flip..].iter().all(|&s| s == 401), "key A after the swap: {statuses:?}");
    assert_eq!(ecds_stat(&envoy, "update_success"), successes + 1);
    assert_eq!(ecds_stat(&envoy, "config_fail"), 0);
}

#[test]
fn rejected_ecds_update_leaves_the_previous_key_set_serving() {
    // A valid, B revoked (the shipped demo set).
    let (upstream, envoy) = start(&substitute_wasm(&shipped("keygate.yaml")));
    let duplicate_hash = plugin_config(&[record("ecd5a001", KEY_A), record("ecd5b002", KEY_B), record("twin", KEY_B)]);
    let bad_updates = [
        ("invalid JSON", r#"{"keys": [ {"id": "ecd5b002",  }"#.to_string(), "keygate: invalid configuration: keys"),
        ("duplicate hash", duplicate_hash, "keygate: invalid configuration: keys[2].hash"),
        ("unknown field", r#"{"keys": [], "key_sets": []}"#.to_string(), "keygate: invalid configuration:"),
    ];
    let traffic = Traffic::start(envoy.port(), KEY_A);
    let_traffic_run(&traffic, 10);
    for (n, (what, configuration, logged)) in bad_updates.iter().enumerate() {
        let fails = ecds_stat(&envoy, "config_fail");
        let rejected = ecds_stat(&envoy, "update_rejected");
        swap(&envoy, &ecds_file(configuration));
        let deadline = Instant::now() + Duration::from_secs(5);
        while ecds_stat(&envoy, "config_fail") == fails {
            assert!(Instant::now() < deadline, "{what}: no config_fail counted within 5 s\n{}", envoy.keygate_log());
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(ecds_stat(&envoy, "config_fail"), fails + 1, "{what}");
        assert_eq!(ecds_stat(&envoy, "update_rejected"), rejected + 1, "{what}");
        assert!(
            envoy.wait_for_log(logged, Duration::from_secs(2)),
            "{what}: `{logged}` not logged\n{}",
            envoy.keygate_log()
        );
        let refused = match envoy.host() {
            Host::Wasm => "Plugin keygate failed to load",
            Host::Native => {
                "Filesystem config update rejected: Failed to create filter config: Failed to initialize dynamic module"
            }
        };
        assert!(envoy.wait_for_log(refused, Duration::from_secs(2)), "{what}: Envoy did not log the rejected plugin");
        // Give the update time to have done harm if it could (1.5 s), then check the old set.
        std::thread::sleep(Duration::from_millis(1500));
        let_traffic_run(&traffic, 10);
        for proto in Proto::ALL {
            assert_eq!(call(&envoy, proto, KEY_A).status, 200, "{what}, {proto:?}: the previous valid key");
            assert_eq!(call(&envoy, proto, KEY_B).status, 401, "{what}, {proto:?}: still revoked");
            assert_eq!(call(&envoy, proto, UNKNOWN_KEY).status, 401, "{what}, {proto:?}: unknown key");
        }
        assert_eq!(count_of(&envoy.keygate_log(), INVALID_CONFIGURATION), n + 1, "{what}: {}", envoy.keygate_log());
    }
    let statuses = traffic.finish();
    let forwarded = upstream.requests();
    assert!(forwarded.iter().all(|r| r.header("x-api-key-id").as_deref() == Some("ecd5a001")), "{forwarded:?}");
    assert_eq!(forwarded.len(), statuses.len() + 2 * bad_updates.len(), "every 200 reached the upstream once");
    assert!(statuses.len() > 50, "too little traffic: {}", statuses.len());
    assert!(statuses.iter().all(|&s| s == 200), "key A during the rejected updates: {statuses:?}");

    // A valid update still goes through after the rejected ones.
    let swapped = swap(&envoy, &ecds_file(&plugin_config(&[record("ecd5b002", KEY_B)])));
    assert!(time_until(&envoy, KEY_B, 200, swapped, Duration::from_secs(1)).is_some());
    assert_eq!(call(&envoy, Proto::Http2, KEY_A).status, 401);
}

#[test]
fn ecds_start_with_a_rejected_configuration_refuses_everything_until_a_valid_one() {
    let (upstream, envoy) = start(&ecds_file(r#"{"keys": "#));
    assert!(envoy.wait_for_log(INVALID_CONFIGURATION, Duration::from_secs(2)));
    for proto in Proto::ALL {
        for key in [KEY_A, UNKNOWN_KEY] {
            let reply = call(&envoy, proto, key);
            assert_eq!((reply.status, reply.body.as_str()), (500, ""), "{proto:?}: {reply:?}");
        }
        assert_eq!(get(envoy.port(), proto, "/healthz", &[]).status, 500, "{proto:?}: even the public route");
    }
    assert!(upstream.requests().is_empty(), "a request went through with no keygate configuration");
    assert_eq!(ecds_stat(&envoy, "config_fail"), 1);

    let swapped = swap(&envoy, &ecds_file(&plugin_config(&[record("ecd5a001", KEY_A)])));
    // Slower than a swap (about 60 ms): the rejected start left no Wasm VM to reuse, so Envoy
    // creates and compiles one first (measured 0.5 to 2 s on a shared 2-core machine).
    let took = time_until(&envoy, KEY_A, 200, swapped, Duration::from_secs(5));
    eprintln!("first valid configuration took effect {took:?} after the rename");
    assert!(took.is_some(), "the first valid configuration did not take effect within 5 s\n{}", envoy.keygate_log());
    for proto in Proto::ALL {
        assert_eq!(call(&envoy, proto, UNKNOWN_KEY).status, 401, "{proto:?}");
    }
}

#[test]
fn ecds_source_file_must_exist_at_start_up() {
    let upstream = Upstream::start();
    let yaml = envoy_yaml(upstream.port());
    let err = Envoy::try_start_with_files(&yaml, "yaml", 1, &[]).err().expect("Envoy started with no ECDS file");
    assert!(err.contains("keygate.yaml' does not exist"), "{}", common::envoy::tail(&err, 20));
}

/// A generated bootstrap (as the other tests use) whose keygate filter comes from the ECDS file
/// `keygate.yaml` in the instance directory, with a `keyset` cluster to `keyset_port`.
fn ecds_bootstrap(upstream_port: u16, keyset_port: u16) -> String {
    let mut opts = EnvoyOptions::new(Some("{}"), upstream_port);
    opts.keyset_port = Some(keyset_port);
    let mut bootstrap = opts.bootstrap();
    bootstrap["node"] = json!({"id": "keygate-test", "cluster": "keygate-test"});
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"][0] = json!({
        "name": "keygate",
        "config_discovery": {
            "config_source": {"path_config_source": {
                "path": format!("{INSTANCE_DIR_TOKEN}/keygate.yaml"),
                "watched_directory": {"path": INSTANCE_DIR_TOKEN},
            }},
            "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"],
        },
    });
    bootstrap.to_string()
}

#[test]
fn key_set_keeps_syncing_across_an_ecds_update() {
    // Both ways at once: inline keys through ECDS, and a key set from an endpoint. An ECDS update
    // replaces keygate's root contexts (as an Istio WasmPlugin update does); the loaded key set
    // must keep serving through it, and polling must carry on, once, in the new configuration.
    const LIVE1: &str = "sk_live_11111111_aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const LIVE2: &str = "sk_live_22222222_bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    let with_inline = |inline: &[Value]| {
        let mut config: Value = serde_json::from_str(&plugin_config(inline)).unwrap();
        config["key_set"] =
            json!({"cluster": "keyset", "path": MANIFEST_PATH, "poll_interval_ms": 500, "timeout_ms": 300});
        ecds_file(&config.to_string())
    };
    let server = KeySetServer::start();
    server.publish(&[record("live1", LIVE1)], 1, 1);
    let upstream = Upstream::start();
    let bootstrap = ecds_bootstrap(upstream.port(), server.port());
    let envoy = Envoy::try_start_with_files(
        &bootstrap,
        "json",
        1,
        &[("keygate.yaml", &with_inline(&[record("ecd5a001", KEY_A)]))],
    )
    .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 80)));
    let loaded = time_until(&envoy, LIVE1, 200, Instant::now(), Duration::from_secs(10));
    assert!(loaded.is_some(), "the key set never loaded\n{}", envoy.keygate_log());
    assert_eq!(call(&envoy, Proto::Http1, KEY_A).status, 200);

    let traffic = Traffic::start(envoy.port(), LIVE1);
    let_traffic_run(&traffic, 20);
    let swapped = swap(&envoy, &with_inline(&[record("ecd5b002", KEY_B)]));
    assert!(time_until(&envoy, KEY_B, 200, swapped, Duration::from_secs(1)).is_some(), "the ECDS update did not apply");
    assert_eq!(call(&envoy, Proto::Http2, KEY_A).status, 401);
    let_traffic_run(&traffic, 20);
    let statuses = traffic.finish();
    assert!(statuses.iter().all(|&s| s == 200), "the key-set key during the ECDS update: {statuses:?}");

    // Polling goes on without a pause: the VM that held the lease keeps it in its new root context,
    // so a new publication shows within a poll interval plus a second.
    let published = Instant::now();
    server.publish(&[record("live1", LIVE1), record("live2", LIVE2)], 1, 2);
    let took = time_until(&envoy, LIVE2, 200, published, Duration::from_millis(500 + 1000));
    eprintln!("after an ECDS update: new key-set key accepted {took:?} after publication");
    assert!(took.is_some(), "the key set stopped syncing after the ECDS update\n{}", envoy.keygate_log());

    // And once per poll: the replaced configuration's contexts do not poll as well.
    server.clear_requests();
    std::thread::sleep(Duration::from_secs(3));
    let fetches = server.count(MANIFEST_PATH);
    assert!((3..=9).contains(&fetches), "{fetches} manifest fetches in 3 s with poll 500 ms");
}
