//! The filter in a real Envoy: exact replies per deny kind, nothing forwarded on a refusal, and the
//! identity the upstream sees on success, over HTTP/1.1 and HTTP/2.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Envoy, EnvoyOptions, Proto, Recorded, Response, Upstream};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const VENUE_KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const PLATFORM_KEY: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";
const REVOKED_KEY: &str = "sk_live_0000cccc_3333333333333333333333333333333333333333333333333333333333333333";
const EXPIRED_KEY: &str = "sk_live_0000dddd_4444444444444444444444444444444444444444444444444444444444444444";
const UNKNOWN_KEY: &str = "sk_live_0000aaaa_9999999999999999999999999999999999999999999999999999999999999999";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

fn config() -> Value {
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "0000aaaa", "hash": hash(VENUE_KEY), "org": "org_42", "name": "venue reader",
             "scopes": ["venues:read", "treatments:read"], "attributes": {"venue": "v_7"}},
            {"id": "0000bbbb", "hash": hash(PLATFORM_KEY), "org": "org_42", "scopes": ["venues:read"]},
            {"id": "0000cccc", "hash": hash(REVOKED_KEY), "org": "org_42", "scopes": ["venues:read"], "revoked": true},
            {"id": "0000dddd", "hash": hash(EXPIRED_KEY), "org": "org_42", "scopes": ["venues:read"],
             "expires_at": "2020-01-01T00:00:00Z"}
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

struct Fixture {
    upstream: Upstream,
    envoy: Envoy,
}

/// One Envoy shared by the tests of this file; each request is tagged so a test sees only what the
/// upstream received from it.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let upstream = Upstream::start();
        let envoy = Envoy::start(&EnvoyOptions::new(Some(&config().to_string()), upstream.port()));
        Fixture { upstream, envoy }
    })
}

/// Sends a request through keygate; returns the reply and what the upstream received of it.
fn call(proto: Proto, method: &str, path: &str, headers: &[(&str, &str)]) -> (Response, Vec<Recorded>) {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let tag = format!("case-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut all = headers.to_vec();
    all.push(("x-test-case", &tag));
    let f = fixture();
    let reply = common::send(f.envoy.port(), proto, method, path, &all);
    let seen = f.upstream.requests().into_iter().filter(|r| r.header("x-test-case").as_deref() == Some(&tag)).collect();
    (reply, seen)
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// Asserts a refusal: exact status and JSON body, the bearer challenge, and nothing forwarded.
fn assert_refused(proto: Proto, path: &str, headers: &[(&str, &str)], status: u16, body: Value, challenge: &str) {
    let (reply, seen) = call(proto, "GET", path, headers);
    assert_eq!(reply.status, status, "{proto:?} {path}: {}", reply.body);
    let got: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{}: {e}", reply.body));
    assert_eq!(got, body, "{proto:?} {path}");
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("www-authenticate"), Some(challenge), "{proto:?} {path}");
    assert!(seen.is_empty(), "{proto:?} {path}: the upstream received {seen:#?}");
}

#[test]
fn missing_key_is_401_missing_api_key() {
    for proto in Proto::ALL {
        let body = json!({"error": "missing_api_key",
                          "message": "No API key was sent. Send it as Authorization: Bearer <key> or x-api-key: <key>."});
        assert_refused(proto, "/v1/venues", &[], 401, body.clone(), r#"Bearer realm="api""#);
        assert_refused(
            proto,
            "/v1/venues",
            &[("authorization", "Basic dXNlcjpwYXNz")],
            401,
            body.clone(),
            r#"Bearer realm="api""#,
        );
        let query = format!("/v1/venues?api_key={PLATFORM_KEY}");
        assert_refused(proto, &query, &[], 401, body, r#"Bearer realm="api""#);
    }
}

#[test]
fn unknown_malformed_and_revoked_keys_are_the_same_401() {
    let body = json!({"error": "invalid_api_key", "message": "The API key is invalid or has been revoked."});
    let challenge = r#"Bearer realm="api", error="invalid_token""#;
    let long = format!("Bearer sk_live_{}", "a".repeat(8 * 1024));
    for proto in Proto::ALL {
        for auth in [
            bearer(UNKNOWN_KEY),
            bearer(REVOKED_KEY),
            "Bearer sk_test_0000aaaa_x".into(),
            long.clone(),
            format!("Bearer {VENUE_KEY} x"),
        ] {
            assert_refused(proto, "/v1/venues", &[("authorization", &auth)], 401, body.clone(), challenge);
        }
        let two = [("authorization", bearer(VENUE_KEY)), ("authorization", bearer(PLATFORM_KEY))];
        let two: Vec<(&str, &str)> = two.iter().map(|(n, v)| (*n, v.as_str())).collect();
        assert_refused(proto, "/v1/venues", &two, 401, body.clone(), challenge);
    }
}

#[test]
fn expired_key_is_401_expired_api_key() {
    for proto in Proto::ALL {
        assert_refused(
            proto,
            "/v1/venues",
            &[("x-api-key", EXPIRED_KEY)],
            401,
            json!({"error": "expired_api_key", "message": "The API key has expired."}),
            r#"Bearer realm="api", error="invalid_token""#,
        );
    }
}

#[test]
fn key_lacking_scope_is_403_with_the_missing_scopes() {
    for proto in Proto::ALL {
        assert_refused(
            proto,
            "/v1/venues/v_7/treatments",
            &[("authorization", &bearer(PLATFORM_KEY))],
            403,
            json!({"error": "Missing scope: treatments:read", "missing": ["treatments:read"]}),
            r#"Bearer realm="api", error="insufficient_scope", scope="treatments:read""#,
        );
    }
}

#[test]
fn venue_restricted_key_cannot_read_other_venue() {
    for proto in Proto::ALL {
        let (reply, seen) = call(
            proto,
            "GET",
            "/v1/venues/v_8/customers",
            &[("authorization", &bearer(VENUE_KEY)), ("x-request-id", "rid-123")],
        );
        assert_eq!(reply.status, 403);
        let body: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(body["error"], "forbidden");
        assert_eq!(body["message"], "The API key may not access this resource.");
        assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
        assert!(seen.is_empty());
    }
}

#[test]
fn path_tricks_do_not_reach_another_venue() {
    // The test Envoy runs with normalize_path off: keygate sees the raw path.
    for proto in Proto::ALL {
        for path in [
            "/v1/venues/v_7/../v_8/customers",
            "/v1/venues/v_7/%2e%2e/v_8/customers",
            "/v1/venues/v_7%2F..%2Fv_8/customers",
            "/v1/venues/v_7/..%2Fv_8/customers",
            "/v1//venues/v_8/customers",
            "/v1/venues/v_8/customers/",
            "/v1/venues/v_8/x/../../../healthz",
        ] {
            let (reply, seen) = call(proto, "GET", path, &[("authorization", &bearer(VENUE_KEY))]);
            assert_eq!(reply.status, 403, "{proto:?} {path}: {}", reply.body);
            assert!(seen.is_empty(), "{proto:?} {path} reached the upstream");
        }
    }
}

#[test]
fn allowed_request_carries_identity_and_no_key() {
    for proto in Proto::ALL {
        let (reply, seen) =
            call(proto, "GET", "/v1/venues/v_7/treatments?page=2", &[("authorization", &bearer(VENUE_KEY))]);
        assert_eq!(reply.status, 200, "{proto:?}: {}", reply.body);
        assert_eq!(reply.body, common::UPSTREAM_BODY);
        let [req] = seen.as_slice() else { panic!("expected one upstream request, got {seen:#?}") };
        assert_eq!(req.path, "/v1/venues/v_7/treatments?page=2");
        assert_eq!(req.header_values("x-org-id"), ["org_42"]);
        assert_eq!(req.header_values("x-api-key-id"), ["0000aaaa"]);
        assert_eq!(req.header_values("x-api-key-scopes"), ["venues:read treatments:read"]);
        assert_eq!(req.header_values("x-venue-id"), ["v_7"]);
        assert!(!req.has_header("authorization"), "{proto:?}: the key reached the upstream");
    }
}

#[test]
fn second_header_key_is_accepted_and_stripped() {
    for proto in Proto::ALL {
        let (reply, seen) = call(proto, "GET", "/v1/venues", &[("X-API-Key", PLATFORM_KEY)]);
        assert_eq!(reply.status, 200, "{}", reply.body);
        let [req] = seen.as_slice() else { panic!("expected one upstream request") };
        assert_eq!(req.header_values("x-api-key-id"), ["0000bbbb"]);
        assert!(!req.has_header("x-api-key"));
        assert!(!req.has_header("x-venue-id"), "a platform-wide key has no venue");
    }
}

#[test]
fn authorization_takes_precedence_and_both_keys_are_stripped() {
    for proto in Proto::ALL {
        let headers = [("x-api-key", PLATFORM_KEY), ("authorization", &bearer(VENUE_KEY))];
        let (reply, seen) = call(proto, "GET", "/v1/venues", &headers);
        assert_eq!(reply.status, 200);
        let [req] = seen.as_slice() else { panic!("expected one upstream request") };
        assert_eq!(req.header_values("x-api-key-id"), ["0000aaaa"]);
        assert!(!req.has_header("x-api-key") && !req.has_header("authorization"));
    }
}

#[test]
fn spoofed_identity_headers_are_replaced_on_protected_routes() {
    for proto in Proto::ALL {
        let headers = [
            ("authorization", bearer(PLATFORM_KEY)),
            ("X-Org-Id", "org_evil".into()),
            ("x-org-id", "org_evil2".into()),
            ("X-API-KEY-ID", "admin".into()),
            ("x-api-key-scopes", "*".into()),
            ("x-venue-id", "v_1".into()),
            ("X-Venue-Id", "v_2".into()),
        ];
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (reply, seen) = call(proto, "GET", "/v1/venues", &headers);
        assert_eq!(reply.status, 200);
        let [req] = seen.as_slice() else { panic!("expected one upstream request") };
        assert_eq!(req.header_values("x-org-id"), ["org_42"]);
        assert_eq!(req.header_values("x-api-key-id"), ["0000bbbb"]);
        assert_eq!(req.header_values("x-api-key-scopes"), ["venues:read"]);
        assert!(req.header_values("x-venue-id").is_empty(), "{:?}", req.header_values("x-venue-id"));
    }
}

#[test]
fn spoofed_identity_headers_are_removed_on_public_routes() {
    for proto in Proto::ALL {
        let headers =
            [("x-org-id", "org_evil"), ("X-Org-Id", "org_evil"), ("x-api-key-scopes", "*"), ("x-api-key", "garbage")];
        let (reply, seen) = call(proto, "GET", "/healthz", &headers);
        assert_eq!(reply.status, 200);
        let [req] = seen.as_slice() else { panic!("expected one upstream request") };
        for name in ["x-org-id", "x-api-key-id", "x-api-key-scopes", "x-venue-id", "x-api-key"] {
            assert!(!req.has_header(name), "{proto:?}: {name} reached the upstream");
        }
    }
}

#[test]
fn unmatched_path_needs_any_valid_key() {
    for proto in Proto::ALL {
        assert_eq!(call(proto, "GET", "/v2/other", &[]).0.status, 401);
        let (reply, seen) = call(proto, "POST", "/v2/other", &[("x-api-key", VENUE_KEY)]);
        assert_eq!(reply.status, 200);
        assert_eq!(seen.len(), 1);
    }
}

/// An Envoy of its own, so that its counters and log hold only this test's traffic.
#[test]
fn stats_count_each_outcome_and_the_log_never_holds_a_key() {
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions::new(Some(&config().to_string()), upstream.port()));
    let port = envoy.port();
    let send = |path: &str, headers: &[(&str, &str)]| common::get(port, Proto::Http1, path, headers).status;
    assert_eq!(send("/v1/venues", &[("authorization", &bearer(VENUE_KEY))]), 200);
    assert_eq!(send("/healthz", &[]), 200);
    assert_eq!(send("/v1/venues", &[]), 401);
    assert_eq!(send("/v1/venues", &[("authorization", &bearer(UNKNOWN_KEY))]), 401);
    assert_eq!(send("/v1/venues", &[("authorization", &bearer(REVOKED_KEY))]), 401);
    assert_eq!(send("/v1/venues", &[("authorization", &bearer(EXPIRED_KEY))]), 401);
    assert_eq!(send("/v1/venues/v_7/treatments", &[("authorization", &bearer(PLATFORM_KEY))]), 403);
    assert_eq!(send("/v1/venues/v_8/x", &[("authorization", &bearer(VENUE_KEY))]), 403);

    let stat = |name: &str| envoy.keygate_stat(&format!("keygate.{name}"));
    assert_eq!(stat("allowed"), Some(2));
    assert_eq!(stat("denied.missing_key"), Some(1));
    assert_eq!(stat("denied.invalid_key"), Some(1));
    assert_eq!(stat("denied.revoked_key"), Some(1));
    assert_eq!(stat("denied.expired_key"), Some(1));
    assert_eq!(stat("denied.insufficient_scope"), Some(1));
    assert_eq!(stat("denied.forbidden"), Some(1));
    assert_eq!(stat("keys"), Some(4));

    assert!(envoy.wait_for_log("keygate: denied forbidden for key 0000aaaa", std::time::Duration::from_secs(5)));
    // Envoy's own `http` component prints every request header at debug level, Authorization
    // included; what keygate is answerable for is its own entries, those of the `wasm` component
    // (of `dynamic_modules` for the native module).
    let _ = envoy.flushed_log();
    let keygate_log = envoy.keygate_log();
    assert!(keygate_log.contains("keygate: allowed key 0000aaaa"), "keygate logged at debug");
    for key in [VENUE_KEY, PLATFORM_KEY, UNKNOWN_KEY, REVOKED_KEY, EXPIRED_KEY] {
        let secret = key.rsplit('_').next().unwrap_or(key);
        assert!(!keygate_log.contains(secret), "a key secret appears in keygate's log:\n{keygate_log}");
    }
}

fn refused_config_log(config: &str) -> String {
    let upstream = Upstream::start();
    match Envoy::try_start(&EnvoyOptions::new(Some(config), upstream.port())) {
        Ok(_) => panic!("Envoy accepted the configuration {config}"),
        Err(log) => log,
    }
}

#[test]
fn invalid_configuration_makes_envoy_refuse_to_start() {
    let mut duplicate = config();
    duplicate["keys"][1]["id"] = json!("0000aaaa");
    let repeated_attribute = config().to_string().replacen(r#""venue":"v_7""#, r#""venue":"v_7","venue":"v_8""#, 1);
    assert!(repeated_attribute.contains(r#""venue":"v_8""#), "the fixture has a venue attribute");
    let mut bad_template = config();
    bad_template["errors"]["forbidden"]["message"] = json!("{whoops}");
    let cases = [
        ("{\"keys\": [", "keygate: invalid configuration: keys: EOF while parsing"),
        (r#"{"keyz": []}"#, "keygate: invalid configuration: keyz: unknown field `keyz`"),
        (
            &duplicate.to_string(),
            "keygate: invalid configuration: keys[1].id: duplicate id \"0000aaaa\" (also keys[0])",
        ),
        (
            r#"{"keys": [{"id": "a", "hash": "abc", "org": "o"}]}"#,
            "keygate: invalid configuration: keys[0].hash: expected 64 hex characters",
        ),
        (&repeated_attribute, "keygate: invalid configuration: keys[0].attributes.venue: repeated name \"venue\""),
        (
            &bad_template.to_string(),
            "keygate: invalid configuration: errors.forbidden.message: unknown placeholder {whoops}",
        ),
        (r#"{"errors": {"teapot": {}}}"#, "keygate: invalid configuration: errors.teapot: unknown field `teapot`"),
        (
            r#"{"routes": [{"path": "/v/{venue_id}/x", "bind": {"venue_id": "venue", "venue_id": "nothing"}}]}"#,
            "keygate: invalid configuration: routes[0].bind.venue_id: repeated name \"venue_id\"",
        ),
        (
            r#"{"scope_implies": {"rw": ["read"], "rw": []}}"#,
            "keygate: invalid configuration: scope_implies.rw: repeated name \"rw\"",
        ),
        (
            r#"{"upstream": {"attribute_headers": {"venue": "x-venue-id", "venue": null}}}"#,
            "keygate: invalid configuration: upstream.attribute_headers.venue: repeated name \"venue\"",
        ),
        (
            r#"{"errors": {"body": {"{nope}": "{code}"}}}"#,
            "keygate: invalid configuration: errors.body: object key \"{nope}\"",
        ),
        (
            r#"{"upstream": {"org_header": "x_api_key_id"}}"#,
            "keygate: invalid configuration: upstream.key_id_header: \"x-api-key-id\" is already used by upstream.org_header",
        ),
    ];
    for (config, expected) in cases {
        let log = refused_config_log(config);
        assert!(log.contains(expected), "expected {expected:?} in Envoy's log:\n{}", common::envoy::tail(&log, 20));
    }
}
