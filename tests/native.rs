//! What only the native dynamic module (`libkeygate.so`, crates/keygate-native) has, in a real
//! Envoy 1.40: it loads and Envoy reports the ABI version it matched, also by file path; its
//! replies, forwarded identity and stripped credential are the wasm filter's on the same requests,
//! side by side; a filter name it does not have is refused; a panic refuses one request; one poll
//! per Envoy process; ECDS replacements leave one ticker thread. Everything else the native module
//! does is proven by the behavioural tests, which `make test` runs on both hosts
//! (`KEYGATE_TEST_HOST=native`).

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::envoy::Host;
use common::{Envoy, EnvoyOptions, KeySetServer, Proto, Recorded, Response, Upstream, MANIFEST_PATH};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

const VENUE_KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const PLATFORM_KEY: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";
const REVOKED_KEY: &str = "sk_live_0000cccc_3333333333333333333333333333333333333333333333333333333333333333";
const EXPIRED_KEY: &str = "sk_live_0000dddd_4444444444444444444444444444444444444444444444444444444444444444";
const UNSCOPED_KEY: &str = "sk_live_0000eeee_5555555555555555555555555555555555555555555555555555555555555555";
const UNKNOWN_KEY: &str = "sk_live_0000aaaa_9999999999999999999999999999999999999999999999999999999999999999";

/// The ABI version Envoy 1.40.0 matches (crates/keygate-native/src/ffi.rs, `ABI_VERSION`).
const ABI_VERSION: &str = "v0.2.0";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

/// tests/filter.rs's configuration, plus a key with no scopes.
fn config() -> Value {
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "0000aaaa", "hash": hash(VENUE_KEY), "org": "org_42", "name": "venue reader",
             "scopes": ["venues:read", "treatments:read"], "attributes": {"venue": "v_7"}},
            {"id": "0000bbbb", "hash": hash(PLATFORM_KEY), "org": "org_42", "scopes": ["venues:read"]},
            {"id": "0000cccc", "hash": hash(REVOKED_KEY), "org": "org_42", "scopes": ["venues:read"], "revoked": true},
            {"id": "0000dddd", "hash": hash(EXPIRED_KEY), "org": "org_42", "scopes": ["venues:read"],
             "expires_at": "2020-01-01T00:00:00Z"},
            {"id": "0000eeee", "hash": hash(UNSCOPED_KEY), "org": "org_43", "scopes": []}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues", "scopes": ["venues:read"]},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
             "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}},
        "errors": {
            "insufficient_scope": {"message": "Missing scope: {missing_scopes}",
                                   "body": {"error": "{message}", "missing": "{missing_scopes}"}},
            "forbidden": {"body": {"error": "{code}", "message": "{message}", "request_id": "{request_id}"}}
        }
    })
}

fn options(host: Host, config: &str, upstream: &Upstream) -> EnvoyOptions {
    let mut options = EnvoyOptions::new(Some(config), upstream.port());
    options.host = host;
    options
}

struct Fixture {
    upstream: Upstream,
    envoy: Envoy,
}

impl Fixture {
    fn start(host: Host) -> Fixture {
        let upstream = Upstream::start();
        let envoy = Envoy::start(&options(host, &config().to_string(), &upstream));
        Fixture { upstream, envoy }
    }

    /// Sends a request; returns the reply and what the upstream received of it (requests are
    /// tagged, so each caller sees only its own).
    fn call(&self, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)]) -> (Response, Vec<Recorded>) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tag = format!("case-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut all = headers.to_vec();
        all.push(("x-test-case", &tag));
        let reply = common::send(self.envoy.port(), proto, method, path, &all);
        let seen =
            self.upstream.requests().into_iter().filter(|r| r.header("x-test-case").as_deref() == Some(&tag)).collect();
        (reply, seen)
    }
}

/// One native Envoy shared by the tests of this file.
fn native() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| Fixture::start(Host::Native))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[test]
fn module_loads_and_envoy_reports_the_abi_version_it_matched() {
    let envoy = &native().envoy;
    assert!(
        envoy.wait_for_log(&format!("Dynamic module ABI version {ABI_VERSION} matched."), Duration::from_secs(5)),
        "Envoy did not report the ABI version {ABI_VERSION} as matched:\n{}",
        envoy.module_log()
    );
    let log = envoy.module_log();
    assert!(!log.contains("is deprecated"), "Envoy warned about the ABI version:\n{log}");
    assert!(log.contains("keygate: configured with 5 inline keys, 4 routes"), "{log}");
}

/// `dynamic_module_config.module.local.filename` instead of a name on the search path.
#[test]
fn module_also_loads_by_file_path() {
    let upstream = Upstream::start();
    let mut bootstrap = options(Host::Native, &config().to_string(), &upstream).bootstrap();
    let listener = &mut bootstrap["static_resources"]["listeners"][0];
    let filter = &mut listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    let path = common::envoy::native_module_path();
    filter["typed_config"]["dynamic_module_config"] = json!({"module": {"local": {"filename": path}}});
    let envoy =
        Envoy::try_start_bootstrap(&bootstrap, 1).unwrap_or_else(|log| panic!("{}", common::envoy::tail(&log, 20)));
    assert_eq!(common::get(envoy.port(), Proto::Http1, "/v1/venues", &[]).status, 401);
    let reply = common::get(envoy.port(), Proto::Http1, "/v1/venues", &[("x-api-key", PLATFORM_KEY)]);
    assert_eq!(reply.status, 200, "{}", reply.body);
}

/// Envoy 1.40's ABI cannot set a header to an empty value (`http_set_header` removes the header
/// then, `http_add_header` refuses): where the wasm filter sends `x-api-key-scopes:` empty for a
/// key without scopes, the native module sends no such header. A client's copy never survives.
#[test]
fn empty_identity_value_reaches_the_upstream_as_no_header() {
    for proto in Proto::ALL {
        let headers = [("x-api-key", UNSCOPED_KEY), ("x-api-key-scopes", "*")];
        let (reply, seen) = native().call(proto, "POST", "/v2/other", &headers);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let [req] = seen.as_slice() else { panic!("expected one upstream request") };
        assert_eq!(req.header_values("x-api-key-id"), ["0000eeee"]);
        assert_eq!(req.header_values("x-org-id"), ["org_43"]);
        assert!(req.header_values("x-api-key-scopes").is_empty(), "{:?}", req.headers);
    }
}

/// What a reply and the upstream's view of a request look like, for comparing two hosts: the
/// reply's status, JSON body (without the per-request `request_id`) and keygate's headers, and
/// the headers the upstream received, sorted, without those that name the Envoy or the request
/// (`host` holds the listener port).
fn outcome(reply: &Response, seen: &[Recorded]) -> Value {
    let mut body: Value = serde_json::from_str(&reply.body).unwrap_or(Value::String(reply.body.clone()));
    if let Some(fields) = body.as_object_mut() {
        fields.remove("request_id");
    }
    let upstream: Vec<Vec<(String, String)>> = seen
        .iter()
        .map(|r| {
            let mut headers: Vec<(String, String)> = r
                .headers
                .iter()
                .filter(|(n, _)| !["host", "x-request-id", "x-test-case"].contains(&n.to_ascii_lowercase().as_str()))
                .map(|(n, v)| (n.to_ascii_lowercase(), v.clone()))
                .collect();
            headers.sort();
            headers
        })
        .collect();
    json!({
        "status": reply.status,
        "body": body,
        "content-type": reply.header("content-type"),
        "www-authenticate": reply.header("www-authenticate"),
        "upstream": upstream,
    })
}

/// A request: method, path and headers.
type Case = (&'static str, String, Vec<(&'static str, String)>);

/// The same requests through the wasm filter and the native module, side by side: every outcome
/// is the same. (The key without scopes is left out: see the test above.)
#[test]
fn native_module_answers_every_request_as_the_wasm_filter_does() {
    let wasm = Fixture::start(Host::Wasm);
    let native = native();
    let token = format!("Token {PLATFORM_KEY}");
    let long = format!("Bearer sk_live_{}", "a".repeat(8 * 1024));
    let cases: Vec<Case> = vec![
        ("GET", "/v1/venues".into(), vec![]),
        ("GET", "/v1/venues".into(), vec![("authorization", bearer(UNKNOWN_KEY))]),
        ("GET", "/v1/venues".into(), vec![("authorization", bearer(REVOKED_KEY))]),
        ("GET", "/v1/venues".into(), vec![("authorization", bearer(EXPIRED_KEY))]),
        ("GET", "/v1/venues".into(), vec![("authorization", long)]),
        ("GET", "/v1/venues".into(), vec![("authorization", "Bearer sk_test_0000aaaa_x".into())]),
        (
            "GET",
            "/v1/venues".into(),
            vec![("authorization", bearer(VENUE_KEY)), ("authorization", bearer(PLATFORM_KEY))],
        ),
        ("GET", "/v1/venues".into(), vec![("x-api-key", PLATFORM_KEY.into()), ("authorization", bearer(VENUE_KEY))]),
        ("GET", "/v1/venues".into(), vec![("x-api-key", PLATFORM_KEY.into()), ("authorization", token)]),
        ("GET", format!("/v1/venues?api_key={PLATFORM_KEY}"), vec![]),
        ("GET", "/v1/venues/v_7/treatments".into(), vec![("authorization", bearer(PLATFORM_KEY))]),
        ("GET", "/v1/venues/v_7/treatments?page=2".into(), vec![("authorization", bearer(VENUE_KEY))]),
        ("GET", "/v1/venues/v_8/customers".into(), vec![("authorization", bearer(VENUE_KEY))]),
        ("GET", "/v1/venues/v_7/%2e%2e/v_8/customers".into(), vec![("authorization", bearer(VENUE_KEY))]),
        ("GET", "/v1//venues/v_8/customers".into(), vec![("authorization", bearer(VENUE_KEY))]),
        ("GET", "/v1/venues/v_8/x/../../../healthz".into(), vec![("authorization", bearer(VENUE_KEY))]),
        ("POST", "/v1/venues/v_7/customers".into(), vec![("x-api-key", VENUE_KEY.into())]),
        (
            "GET",
            "/v1/venues/v_7/treatments".into(),
            vec![("x-api-key", VENUE_KEY.into()), ("x-original-url", "/v1/venues/v_8/treatments".into())],
        ),
        (
            "POST",
            "/v1/venues/v_7/treatments".into(),
            vec![("x-api-key", PLATFORM_KEY.into()), ("x-http-method-override", "GET".into())],
        ),
        (
            "GET",
            "/v1/venues".into(),
            vec![
                ("authorization", bearer(PLATFORM_KEY)),
                ("X-Org-Id", "org_evil".into()),
                ("x-api-key-scopes", "*".into()),
                ("X-Venue-Id", "v_2".into()),
            ],
        ),
        ("GET", "/healthz".into(), vec![("x-org-id", "org_evil".into()), ("x-api-key", "garbage".into())]),
        ("POST", "/v2/other".into(), vec![]),
        ("POST", "/v2/other".into(), vec![("x-api-key", VENUE_KEY.into())]),
    ];
    for proto in Proto::ALL {
        for (method, path, headers) in &cases {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let (wasm_reply, wasm_seen) = wasm.call(proto, method, path, &headers);
            let (native_reply, native_seen) = native.call(proto, method, path, &headers);
            assert_eq!(
                outcome(&native_reply, &native_seen),
                outcome(&wasm_reply, &wasm_seen),
                "{proto:?} {method} {path} {headers:?}: native (left) and wasm (right) differ"
            );
        }
    }
}

/// Starts Envoy on `bootstrap` and returns its log, which must show that it refused to start.
fn refused(bootstrap: &Value) -> String {
    match Envoy::try_start_bootstrap(bootstrap, 1) {
        Ok(_) => panic!("Envoy accepted the configuration {bootstrap:#}"),
        Err(log) => log,
    }
}

fn assert_logged(log: &str, expected: &str) {
    assert!(
        log.contains("[error][dynamic_modules]") && log.contains(expected),
        "expected {expected:?}, at error level, in Envoy's log:\n{}",
        common::envoy::tail(log, 20)
    );
}

#[test]
fn another_filter_name_is_refused() {
    let upstream = Upstream::start();
    let mut bootstrap = options(Host::Native, &config().to_string(), &upstream).bootstrap();
    let listener = &mut bootstrap["static_resources"]["listeners"][0];
    let hcm = &mut listener["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"][0]["typed_config"]["filter_name"] = json!("keygate-v2");
    let log = refused(&bootstrap);
    assert_logged(&log, "keygate: unknown filter_name \"keygate-v2\": this module has one filter, \"keygate\"");
}

/// The native module's probe build (`make build-probe`): `$KEYGATE_PROBE_NATIVE`, else
/// `<repo>/target/probe/release/libkeygate.so`.
fn probe_module_path() -> std::path::PathBuf {
    let path = std::env::var_os("KEYGATE_PROBE_NATIVE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| common::repo_root().join("target/probe/release/libkeygate.so"));
    assert!(path.is_file(), "{} is missing: run `make build-probe` (make test does)", path.display());
    path
}

/// There is no failure policy for a dynamic module: a panic on the request path must be caught in
/// the module (every native build unwinds) and answered as a refusal of that request, while Envoy,
/// and every other request, carries on.
#[test]
fn a_panic_in_the_module_refuses_that_request_and_envoy_keeps_serving() {
    let upstream = Upstream::start();
    let mut bootstrap = options(Host::Native, &config().to_string(), &upstream).bootstrap();
    let listener = &mut bootstrap["static_resources"]["listeners"][0];
    let filter = &mut listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0];
    filter["typed_config"]["dynamic_module_config"] = json!({"module": {"local": {"filename": probe_module_path()}}});
    let envoy =
        Envoy::try_start_bootstrap(&bootstrap, 1).unwrap_or_else(|log| panic!("{}", common::envoy::tail(&log, 20)));
    let key = [("x-api-key", PLATFORM_KEY)];
    for proto in [Proto::Http1, Proto::Http2] {
        let crash = common::get(envoy.port(), proto, "/v1/venues", &[key[0], ("x-keygate-panic-probe", "1")]);
        assert_eq!(crash.status, 500, "{proto:?}: {}", crash.body);
        assert!(crash.body.contains("internal_error"), "{}", crash.body);
        let after = common::get(envoy.port(), proto, "/v1/venues", &key);
        assert_eq!(after.status, 200, "{proto:?}: Envoy must keep serving: {}", after.body);
    }
    let seen = upstream.requests();
    assert_eq!(seen.len(), 2, "only the two requests without the probe reach the upstream: {seen:?}");
    assert!(seen.iter().all(|r| r.header("x-keygate-panic-probe").is_none()), "{seen:?}");
    assert!(envoy.wait_for_log("keygate: internal error on the request path", Duration::from_secs(2)));
}

// ---- Live key sets --------------------------------------------------------------------------------

const LIVE_POLL_MS: u64 = 500;
/// One poll interval, a tick (a fifth of it, at least 100 ms) and a second of slack.
const LIVE_CHANGE_BOUND: Duration = Duration::from_millis(LIVE_POLL_MS + LIVE_POLL_MS / 5 + 1000);

fn live_key(id: &str) -> String {
    format!("sk_live_{id}_{}", common::keyset::sha256_hex(format!("secret of {id}").as_bytes()))
}

fn live_record(id: &str) -> Value {
    json!({"id": id, "hash": hash(&live_key(id)), "org": "org_42", "scopes": []})
}

fn live_config() -> String {
    json!({
        "credential": {"prefixes": ["sk_live_"]},
        "key_set": {"cluster": common::KEYSET_CLUSTER, "authority": "keys.internal", "path": MANIFEST_PATH,
                    "poll_interval_ms": LIVE_POLL_MS, "timeout_ms": 300},
    })
    .to_string()
}

struct LiveFixture {
    server: KeySetServer,
    _upstream: Upstream,
    envoy: Envoy,
}

impl LiveFixture {
    fn start(server: KeySetServer, concurrency: u32) -> LiveFixture {
        let upstream = Upstream::start();
        let mut opts = options(Host::Native, &live_config(), &upstream);
        opts.keyset_port = Some(server.port());
        opts.concurrency = concurrency;
        let envoy = Envoy::start(&opts);
        LiveFixture { server, _upstream: upstream, envoy }
    }

    fn status(&self, id: &str) -> u16 {
        common::get(self.envoy.port(), Proto::Http1, "/v1/things", &[("authorization", &bearer(&live_key(id)))]).status
    }

    fn stat(&self, name: &str) -> Option<u64> {
        self.envoy.stat(&format!("dynamicmodulescustom.keygate.key_set.{name}"))
    }

    /// Waits until `check` holds, or panics with the module's log.
    fn wait(&self, what: &str, within: Duration, check: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + within;
        while !check() {
            if std::time::Instant::now() >= deadline {
                panic!("{what}: not within {within:?}\nmodule log:\n{}", self.envoy.module_log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

#[test]
fn one_envoy_process_polls_the_manifest_once_per_interval_with_two_workers() {
    let server = KeySetServer::start();
    server.publish(&[live_record("k1")], 1, 1);
    let live = LiveFixture::start(server, 2);
    live.wait("version 1 loaded", Duration::from_secs(10), || live.stat("version") == Some(1));
    // Every worker serves the one copy.
    for _ in 0..20 {
        assert_eq!(live.status("k1"), 200);
    }
    live.server.clear_requests();
    let window = Duration::from_millis(LIVE_POLL_MS * 8);
    std::thread::sleep(window);
    let polls = live.server.count(MANIFEST_PATH) as u64;
    let most = window.as_millis() as u64 / LIVE_POLL_MS + 1;
    assert!(
        polls >= 4 && polls <= most,
        "{polls} manifest polls in {window:?}, one process polling every {LIVE_POLL_MS} ms"
    );
}

/// An ECDS file holding the native filter with `plugin` as its configuration.
fn native_ecds_file(plugin: &str) -> String {
    let mut filter = common::envoy::native_filter(plugin);
    let typed = filter["typed_config"].take();
    json!({"resources": [{
        "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
        "name": "keygate",
        "typed_config": typed,
    }]})
    .to_string()
}

/// Generation `n` of an ECDS configuration with a live key set (fetch timeout `timeout_ms`): each
/// differs from the others by a public route `/public/<n>`, so Envoy makes a new configuration for
/// every one.
fn ecds_generation(n: usize, timeout_ms: u64) -> String {
    let mut config: Value = serde_json::from_str(&live_config()).unwrap();
    config["key_set"]["timeout_ms"] = json!(timeout_ms);
    config["routes"] = json!([{"path": format!("/public/{n}"), "public": true}]);
    native_ecds_file(&config.to_string())
}

/// Envoy with two workers whose keygate filter comes from a file-based ECDS source holding
/// generation 0, polling `server`.
fn ecds_live_fixture(server: KeySetServer, timeout_ms: u64) -> LiveFixture {
    let upstream = Upstream::start();
    let mut opts = options(Host::Native, "{}", &upstream);
    opts.keyset_port = Some(server.port());
    opts.concurrency = 2;
    let mut bootstrap = opts.bootstrap();
    bootstrap["node"] = json!({"id": "keygate-test", "cluster": "keygate-test"});
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    hcm["http_filters"][0] = json!({
        "name": "keygate",
        "config_discovery": {
            "config_source": {"path_config_source": {
                "path": format!("{}/keygate.yaml", common::envoy::INSTANCE_DIR_TOKEN),
                "watched_directory": {"path": common::envoy::INSTANCE_DIR_TOKEN},
            }},
            "type_urls": ["type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"],
        },
    });
    let first = ecds_generation(0, timeout_ms);
    let envoy = Envoy::try_start_with_files(&bootstrap.to_string(), "json", 2, &[("keygate.yaml", &first)])
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 80)));
    LiveFixture { server, _upstream: upstream, envoy }
}

impl LiveFixture {
    /// Replaces the ECDS file with generation `n` (by a rename) and waits until it serves.
    fn replace_with_generation(&self, n: usize, timeout_ms: u64) {
        let tmp = self.envoy.dir().join("keygate.yaml.tmp");
        std::fs::write(&tmp, ecds_generation(n, timeout_ms)).unwrap();
        std::fs::rename(&tmp, self.envoy.dir().join("keygate.yaml")).unwrap();
        let public = format!("/public/{n}");
        self.wait("the ECDS update", Duration::from_secs(5), || {
            common::get(self.envoy.port(), Proto::Http1, &public, &[]).status == 200
        });
    }

    /// The `keygate-tick` threads alive in Envoy.
    fn ticker_threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.envoy.pid()))
            .unwrap()
            .filter(|t| {
                let comm = t.as_ref().unwrap().path().join("comm");
                std::fs::read_to_string(comm).unwrap_or_default().trim() == "keygate-tick"
            })
            .count()
    }
}

#[test]
fn replacing_the_configuration_through_ecds_keeps_the_set_serving_and_polling_once_without_a_crash() {
    let server = KeySetServer::start();
    server.publish(&[live_record("k1")], 1, 1);
    let live = ecds_live_fixture(server, 300);
    live.wait("version 1 loaded", Duration::from_secs(10), || live.stat("version") == Some(1));

    for n in 1..=6 {
        live.replace_with_generation(n, 300);
        // The set loaded by an earlier configuration serves the new one at once.
        assert_eq!(live.status("k1"), 200, "after ECDS update {n}");
    }
    // Polling carries on in the newest configuration, once per interval for the process.
    let published = std::time::Instant::now();
    live.server.publish(&[live_record("k1"), live_record("k2")], 1, 2);
    live.wait("a publication after the updates", LIVE_CHANGE_BOUND, || live.status("k2") == 200);
    eprintln!("after 6 ECDS updates: a new key accepted {:?} after publication", published.elapsed());
    live.server.clear_requests();
    std::thread::sleep(Duration::from_secs(3));
    let polls = live.server.count(MANIFEST_PATH);
    assert!((4..=7).contains(&polls), "{polls} manifest polls in 3 s with poll {LIVE_POLL_MS} ms");
    // The replaced configurations' ticker threads are gone: one `keygate-tick` thread is left.
    assert_eq!(live.ticker_threads(), 1, "ticker threads alive after 6 replacements");
    assert_eq!(live.status("k1"), 200);
}

/// Envoy destroys a replaced configuration whatever its sync is doing. Envoy 1.40 calls the
/// module's destroy hook, then cancels the configuration's callouts still in flight, so the answer
/// of a key-set fetch started by a configuration that is gone never reaches the module. With every
/// manifest answer 1.5 s slow, the poller is nearly always waiting for one when it is replaced.
#[test]
fn a_configuration_replaced_while_its_fetch_is_in_flight_leaves_envoy_serving() {
    const SLOW: Duration = Duration::from_millis(1_500);
    let server = KeySetServer::start();
    server.publish(&[live_record("k1")], 1, 1);
    server.set_fault(MANIFEST_PATH, Some(common::Fault::Slow(SLOW)));
    let live = ecds_live_fixture(server, 5_000);
    live.wait("version 1 loaded", Duration::from_secs(10), || live.stat("version") == Some(1));
    let pid = live.envoy.pid();
    let mut replaced = Vec::new();
    for n in 1..=6 {
        replaced.push(std::time::Instant::now());
        live.replace_with_generation(n, 5_000);
        assert_eq!(live.status("k1"), 200, "after ECDS update {n}");
        std::thread::sleep(Duration::from_millis(700));
    }
    // Fetches that were waiting for their answer when a configuration was replaced.
    let straddling = live
        .server
        .requests_for(MANIFEST_PATH)
        .iter()
        .filter(|r| replaced.iter().any(|at| r.at < *at && *at < r.at + SLOW))
        .count();
    eprintln!("{straddling} manifest fetches were in flight as 6 configurations were replaced");
    assert!(straddling >= 3, "only {straddling} fetches in flight across the replacements");
    live.server.clear_faults();
    live.server.publish(&[live_record("k1"), live_record("k2")], 1, 2);
    live.wait("a publication after the updates", LIVE_CHANGE_BOUND + SLOW, || live.status("k2") == 200);
    assert_eq!(live.envoy.pid(), pid);
    assert_eq!(live.envoy.admin_get("/ready").body.trim(), "LIVE");
    assert_eq!(live.ticker_threads(), 1);
}
