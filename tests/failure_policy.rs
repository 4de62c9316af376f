//! A crash inside the filter never lets a request through: Envoy's `failure_policy` for keygate, in a
//! real Envoy, with a test-only build that crashes on demand (`make build-probe`).

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Envoy, EnvoyOptions, Proto, Upstream};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};

const KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const PROBE: (&str, &str) = ("x-keygate-panic-probe", "1");

fn probe_wasm() -> PathBuf {
    common::envoy::probe_wasm_path()
}

/// Envoy running the crash-on-demand build under `failure_policy`.
fn start(upstream: &Upstream, failure_policy: &str) -> Envoy {
    let config = json!({"keys": [{"id": "0000aaaa", "hash": hex::encode(hash_key(KEY.as_bytes())), "org": "org_42"}]});
    let mut opts = EnvoyOptions::new(Some(&config.to_string()), upstream.port());
    opts.failure_policy = Some(failure_policy.to_string());
    let mut bootstrap = opts.bootstrap();
    let wasm = probe_wasm();
    replace_wasm(&mut bootstrap, &wasm.to_string_lossy());
    Envoy::try_start_bootstrap(&bootstrap, 1)
        .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 30)))
}

fn replace_wasm(value: &mut Value, wasm: &str) {
    match value {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                if k == "filename" {
                    *v = json!(wasm);
                } else {
                    replace_wasm(v, wasm);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| replace_wasm(v, wasm)),
        _ => {}
    }
}

fn status(envoy: &Envoy, proto: Proto, headers: &[(&str, &str)]) -> u16 {
    common::get(envoy.port(), proto, "/v1/x", headers).status
}

#[test]
fn fail_closed_refuses_the_crashing_request_and_every_later_one() {
    let upstream = Upstream::start();
    let envoy = start(&upstream, "FAIL_CLOSED");
    let auth = format!("Bearer {KEY}");
    assert_eq!(status(&envoy, Proto::Http1, &[("authorization", &auth)]), 200);
    upstream.clear();
    for proto in Proto::ALL {
        let crashed = status(&envoy, proto, &[("authorization", &auth), PROBE]);
        assert_eq!(crashed, 503, "{proto:?}: the request that crashed the filter");
        for _ in 0..3 {
            assert_eq!(status(&envoy, proto, &[("authorization", &auth)]), 503, "{proto:?}: after the crash");
        }
    }
    assert!(upstream.requests().is_empty(), "a request reached the upstream after the filter crashed");
    assert!(envoy.wasm_log().contains("keygate") || envoy.log().contains("wasm"), "the crash is logged");
}

#[test]
fn fail_reload_refuses_the_crashing_request_then_serves_with_a_fresh_vm() {
    let upstream = Upstream::start();
    let envoy = start(&upstream, "FAIL_RELOAD");
    let auth = format!("Bearer {KEY}");
    for proto in Proto::ALL {
        upstream.clear();
        let crashed = status(&envoy, proto, &[("authorization", &auth), PROBE]);
        assert_eq!(crashed, 503, "{proto:?}: the request that crashed the filter");
        assert!(upstream.requests().is_empty(), "{proto:?}: the crashing request reached the upstream");
        // Envoy reloads the VM after a backoff; until then every request is refused, never let through.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut reply = status(&envoy, proto, &[]);
        while reply == 503 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            reply = status(&envoy, proto, &[]);
        }
        assert!(upstream.requests().is_empty(), "{proto:?}: a request reached the upstream while the VM reloaded");
        assert_eq!(reply, 401, "{proto:?}: the reloaded filter refuses a missing key");
        assert_eq!(status(&envoy, proto, &[("authorization", &auth)]), 200, "{proto:?}: the reloaded filter serves");
        assert_eq!(upstream.requests().len(), 1);
    }
    assert!(envoy.stat("wasm.keygate.vm_reload_success").unwrap_or(0) >= 2, "{:?}", envoy.stats());
}
