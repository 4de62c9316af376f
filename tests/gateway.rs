//! The Envoy Gateway manifests of `envoy/gateway/` (README "Envoy Gateway"), as far as they can be
//! checked without Kubernetes: every policy uses a module its EnvoyProxy registers, names keygate's
//! filter, and carries a configuration keygate compiles; a live key set's cluster is one the
//! EnvoyProxy's bootstrap adds; and the native module, in Envoy 1.40 as Envoy Gateway writes the
//! filter (loaded by file, disabled on the listener, enabled on the policy's route), answers the
//! demo keys as the manifest's comments say.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::envoy::{native_filter, native_module_path, yaml_documents, Host};
use common::{get, repo_root, Envoy, EnvoyOptions, Proto, Upstream};
use keygate_core::plugin::Plugin;
use serde_json::{json, Value};

const MANIFESTS: [&str; 2] = ["envoy/gateway/keygate.yaml", "envoy/gateway/keygate-key-set.yaml"];

/// The demo keys listed in envoy/gateway/keygate.yaml's comments.
const VENUE_KEY: &str = "sk_live_ab12cd34_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
const PLATFORM_KEY: &str = "sk_live_5e6f7a8b_0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const REVOKED_KEY: &str = "sk_live_c0ffee00_deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";

fn documents(path: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    yaml_documents(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

/// The `dynamicModule` entries of the manifest's policies.
fn policy_modules(docs: &[Value]) -> Vec<&Value> {
    of_kind(docs, "EnvoyExtensionPolicy").iter().flat_map(|p| p["spec"]["dynamicModule"].as_array().unwrap()).collect()
}

#[test]
fn every_policy_uses_a_registered_module_and_a_configuration_keygate_compiles() {
    for path in MANIFESTS {
        let docs = documents(path);
        let [proxy] = of_kind(&docs, "EnvoyProxy")[..] else { panic!("{path}: expected one EnvoyProxy") };
        let registered: Vec<&Value> = proxy["spec"]["dynamicModules"].as_array().unwrap().iter().collect();
        let modules = policy_modules(&docs);
        assert!(!modules.is_empty(), "{path}: no EnvoyExtensionPolicy with a dynamicModule");
        for module in modules {
            let registration = registered.iter().find(|r| r["name"] == module["name"]);
            let registration = registration.unwrap_or_else(|| panic!("{path}: {} is not registered", module["name"]));
            assert!(
                registration["source"]["local"]["path"].as_str().unwrap().ends_with("/libkeygate.so"),
                "{path}: {registration}"
            );
            assert_eq!(module["filterName"], "keygate", "{path}");
            let config = module["config"].to_string();
            if let Err(e) = Plugin::from_json(config.as_bytes()) {
                panic!("{path}: the policy's config does not compile: {e}");
            }
            // A live key set polls through a cluster the EnvoyProxy's bootstrap adds.
            if let Some(cluster) = module["config"]["key_set"]["cluster"].as_str() {
                let bootstrap = &proxy["spec"]["bootstrap"];
                assert_eq!(bootstrap["type"], "Merge", "{path}");
                let merged = yaml_documents(bootstrap["value"].as_str().unwrap()).unwrap();
                let clusters = merged[0]["static_resources"]["clusters"].as_array().unwrap();
                assert!(clusters.iter().any(|c| c["name"] == cluster), "{path}: no bootstrap cluster {cluster}");
            }
        }
    }
}

#[test]
fn the_module_as_envoy_gateway_writes_it_answers_the_demo_keys_on_the_policys_route_only() {
    // Envoy Gateway loads the module by file, puts the filter on the listener disabled and enables
    // it on each route its policy covers (`typed_per_filter_config`).
    let docs = documents(MANIFESTS[0]);
    let config = policy_modules(&docs)[0]["config"].to_string();
    let upstream = Upstream::start();
    let mut options = EnvoyOptions::new(Some(&config), upstream.port());
    options.host = Host::Native;
    let mut bootstrap = options.bootstrap();
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let mut filter = native_filter(&config);
    filter["typed_config"]["dynamic_module_config"] = json!({"module": {"local": {"filename": native_module_path()}}});
    filter["disabled"] = json!(true);
    hcm["http_filters"][0] = filter;
    let routes = &mut hcm["route_config"]["virtual_hosts"][0]["routes"];
    let upstream_route = routes[0]["route"].clone();
    *routes = json!([
        {"match": {"prefix": "/elsewhere"}, "route": upstream_route},
        {"match": {"prefix": "/"}, "route": upstream_route, "typed_per_filter_config": {
            "keygate": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}}},
    ]);
    let envoy =
        Envoy::try_start_bootstrap(&bootstrap, 1).unwrap_or_else(|log| panic!("{}", common::envoy::tail(&log, 30)));
    let call = |path: &str, key: Option<&str>| {
        let auth = key.map(|k| format!("Bearer {k}"));
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
        get(envoy.port(), Proto::Http1, path, &headers).status
    };
    assert_eq!(call("/v1/venues", None), 401);
    assert_eq!(call("/v1/venues/v_7", Some(VENUE_KEY)), 200);
    assert_eq!(call("/v1/venues/v_7/treatments", Some(PLATFORM_KEY)), 403, "venues:read only");
    assert_eq!(call("/v1/venues/v_8", Some(VENUE_KEY)), 403, "another venue");
    assert_eq!(call("/v1/venues", Some(REVOKED_KEY)), 401);
    assert_eq!(call("/healthz", None), 200);
    let forwarded = upstream.requests();
    let venue = forwarded.iter().find(|r| r.path == "/v1/venues/v_7").expect("the accepted request");
    assert_eq!(venue.header("x-api-key-id").as_deref(), Some("ab12cd34"));
    assert_eq!(venue.header("x-venue-id").as_deref(), Some("v_7"));
    assert!(!venue.has_header("authorization"));
    // No policy on this route: the filter stays off, as Envoy Gateway leaves it.
    assert_eq!(call("/elsewhere", None), 200);
}
