//! Request trailers in a real Envoy, through both hosts (the wasm filter and the native module),
//! over HTTP/2 and chunked HTTP/1.1. Trailers reach the upstream after keygate decided on the
//! headers, so a client could put a key or a forged identity there, which an upstream that merges
//! trailers into headers would believe. keygate removes from a request's trailers every header it
//! reads or sets on the request's headers, in every spelling it guards there; any other trailer
//! goes through. A refused request forwards nothing, trailers or not.
//!
//! Envoy drops HTTP/1.1 trailers unless `enable_trailers` is set, on the listener (to read them
//! from a chunked request) and on the cluster (to send them to the HTTP/1.1 recording upstream):
//! every Envoy here sets both, so whatever keygate lets through arrives.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::envoy::Host;
use common::{Envoy, EnvoyOptions, Proto, Recorded, Response, Upstream};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

const KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
/// Another valid key, of another organisation: a trailer must not carry it to the upstream either.
const OTHER_KEY: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";

const HOSTS: [Host; 2] = [Host::Wasm, Host::Native];

fn config() -> Value {
    let hash = |key: &str| hex::encode(hash_key(key.as_bytes()));
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "0000aaaa", "hash": hash(KEY), "org": "org_42", "scopes": ["venues:read"],
             "attributes": {"venue": "v_7"}},
            {"id": "0000bbbb", "hash": hash(OTHER_KEY), "org": "org_66", "scopes": ["venues:read", "admin"]}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    })
}

/// Trailers a client may send to smuggle a credential or an identity past keygate: the credential
/// headers and every identity header keygate sets, in several spellings a CGI-style server reads
/// as them, and the override headers keygate reads the method and path from.
const SMUGGLED: [(&str, &str); 15] = [
    ("authorization", "Bearer sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222"),
    ("x-api-key", OTHER_KEY),
    ("x_api_key", OTHER_KEY),
    ("x-org-id", "org_66"),
    ("x_org_id", "org_66"),
    ("X-Org_Id", "org_66"),
    ("x.org.id", "org_66"),
    ("x-api-key-id", "0000bbbb"),
    ("x_api_key_id", "0000bbbb"),
    ("x-api-key-scopes", "venues:read admin"),
    ("x~api~key~scopes", "admin"),
    ("x-venue-id", "v_8"),
    ("x_venue_id", "v_8"),
    ("x-http-method-override", "DELETE"),
    ("x-original-url", "/v1/venues/v_8/admin"),
];

/// A trailer keygate has no business with: it must arrive, which also proves that this Envoy
/// forwards trailers at all.
const HARMLESS: (&str, &str) = ("x-checksum", "sha256-7f3a");

struct Fixture {
    upstream: Upstream,
    envoy: Envoy,
}

impl Fixture {
    fn start(host: Host) -> Fixture {
        let upstream = Upstream::start();
        let mut options = EnvoyOptions::new(Some(&config().to_string()), upstream.port());
        options.host = host;
        let mut bootstrap = options.bootstrap();
        let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        hcm["http_protocol_options"] = json!({"enable_trailers": true});
        let cluster = &mut bootstrap["static_resources"]["clusters"][0];
        assert_eq!(cluster["name"], "upstream");
        cluster["typed_extension_protocol_options"] = json!({
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http_protocol_options": {"enable_trailers": true}},
            }
        });
        let envoy = Envoy::try_start_bootstrap(&bootstrap, 1)
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 40)));
        Fixture { upstream, envoy }
    }

    /// Sends a POST with a body and `trailers`; returns the reply and what the upstream received
    /// of it (requests are tagged, so each caller sees only its own).
    fn call(
        &self,
        proto: Proto,
        path: &str,
        headers: &[(&str, &str)],
        trailers: &[(&str, &str)],
    ) -> (Response, Vec<Recorded>) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let tag = format!("case-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let mut all = headers.to_vec();
        all.push(("x-test-case", &tag));
        let reply = common::try_send_with_trailers(self.envoy.port(), proto, "POST", path, &all, b"{}", trailers)
            .unwrap_or_else(|e| panic!("{proto:?} POST {path}: {e}"));
        let seen =
            self.upstream.requests().into_iter().filter(|r| r.header("x-test-case").as_deref() == Some(&tag)).collect();
        (reply, seen)
    }
}

/// One Envoy per host, shared by the tests of this file.
fn fixture(host: Host) -> &'static Fixture {
    static WASM: OnceLock<Fixture> = OnceLock::new();
    static NATIVE: OnceLock<Fixture> = OnceLock::new();
    match host {
        Host::Wasm => WASM.get_or_init(|| Fixture::start(Host::Wasm)),
        Host::Native => NATIVE.get_or_init(|| Fixture::start(Host::Native)),
    }
}

/// Every smuggled trailer, with the harmless one among them.
fn trailers() -> Vec<(&'static str, &'static str)> {
    let mut all = SMUGGLED.to_vec();
    all.insert(4, HARMLESS);
    all
}

/// A name as a CGI-style server reads it: case and punctuation aside.
fn cgi(name: &str) -> String {
    name.bytes().map(|c| if c.is_ascii_alphanumeric() { char::from(c.to_ascii_lowercase()) } else { '-' }).collect()
}

/// The one request the upstream received, with nothing of `SMUGGLED` in its trailers or headers
/// but what keygate set.
fn assert_forwarded_clean(what: &str, seen: &[Recorded], identity: &[(&str, &str)]) {
    let [request] = seen else { panic!("{what}: the upstream should have received one request: {seen:#?}") };
    assert_eq!(request.trailers, [(HARMLESS.0.to_string(), HARMLESS.1.to_string())], "{what}: trailers forwarded");
    assert_eq!(request.body, b"{}", "{what}");
    for (name, _) in SMUGGLED {
        let expected: Vec<String> =
            identity.iter().filter(|(n, _)| cgi(n) == cgi(name)).map(|(_, v)| v.to_string()).collect();
        let got: Vec<String> =
            request.headers.iter().filter(|(n, _)| cgi(n) == cgi(name)).map(|(_, v)| v.clone()).collect();
        assert_eq!(got, expected, "{what}: headers the upstream read as {name}");
    }
    let all = format!("{:?} {:?}", request.headers, request.trailers);
    assert!(!all.contains(OTHER_KEY) && !all.contains(KEY), "{what}: a key reached the upstream: {all}");
}

#[test]
fn an_allowed_request_forwards_no_key_or_identity_from_its_trailers() {
    let auth = format!("Bearer {KEY}");
    for host in HOSTS {
        for proto in Proto::ALL {
            let what = format!("{host:?} {proto:?}");
            let (reply, seen) =
                fixture(host).call(proto, "/v1/venues/v_7/bookings", &[("authorization", &auth)], &trailers());
            assert_eq!(reply.status, 200, "{what}: {}", reply.body);
            let identity = [
                ("x-org-id", "org_42"),
                ("x-api-key-id", "0000aaaa"),
                ("x-api-key-scopes", "venues:read"),
                ("x-venue-id", "v_7"),
            ];
            assert_forwarded_clean(&what, &seen, &identity);
        }
    }
}

#[test]
fn a_public_route_forwards_no_key_or_identity_from_its_trailers() {
    for host in HOSTS {
        for proto in Proto::ALL {
            let what = format!("{host:?} {proto:?}");
            let (reply, seen) = fixture(host).call(proto, "/healthz", &[], &trailers());
            assert_eq!(reply.status, 200, "{what}: {}", reply.body);
            assert_forwarded_clean(&what, &seen, &[]);
        }
    }
}

#[test]
fn a_refused_request_with_trailers_forwards_nothing() {
    let auth = format!("Bearer {KEY}");
    let with_header = [("authorization", auth.as_str())];
    // (path, headers, status): no key but in a trailer, and a key for another venue.
    let cases = [("/v1/venues/v_7/bookings", &[][..], 401), ("/v1/venues/v_8/bookings", &with_header[..], 403)];
    for host in HOSTS {
        for proto in Proto::ALL {
            for (path, headers, status) in cases {
                let what = format!("{host:?} {proto:?} {path}");
                let mut with_key = trailers();
                with_key.push(("authorization", &auth));
                let (reply, seen) = fixture(host).call(proto, path, headers, &with_key);
                assert_eq!(reply.status, status, "{what}: {}", reply.body);
                assert!(seen.is_empty(), "{what}: the upstream received {seen:#?}");
            }
        }
    }
}
