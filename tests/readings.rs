//! The readings an upstream takes of a request, against a real Envoy, over HTTP/1.1 and HTTP/2, with
//! Envoy's `normalize_path` on and off: a method in another case, path parameters (`;`, `..;`), the
//! case of literal segments, a joined `Authorization`, and underscore spellings of identity headers.
//! Each request must get what the strictest reading needs; on a refusal nothing reaches the upstream,
//! and on an allowed request no credential or forged identity does, in any spelling.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Envoy, EnvoyOptions, Proto, Recorded, Response, Upstream};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};

const VENUE: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const PLATFORM: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

/// `/docs/**` is public; the treatments route is GET-only and needs more than the venue catch-all.
/// `x-api-key` is read before `Authorization`, so a joined `Authorization` can sit beside the
/// deciding header.
fn config() -> String {
    json!({
        "credential": {"headers": ["x-api-key", "authorization"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "0000aaaa", "hash": hash(VENUE), "org": "org_42", "scopes": ["venues:read", "treatments:read"],
             "attributes": {"venue": "v_7"}},
            {"id": "0000bbbb", "hash": hash(PLATFORM), "org": "org_42", "scopes": ["venues:read"]}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"path": "/docs/**", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
             "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    })
    .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Forwarded, with this key id in `x-api-key-id` (or none, on a public route).
    Allowed(Option<&'static str>),
    /// Refused with this status and body `error` code; nothing forwarded.
    Refused(u16, &'static str),
}

use Outcome::{Allowed, Refused};

struct Gateway {
    upstream: Upstream,
    envoy: Envoy,
    /// Envoy's `normalize_path` and `merge_slashes`.
    normalize: bool,
}

impl Gateway {
    fn start(normalize_path: bool) -> Gateway {
        Gateway::start_with(&config(), normalize_path)
    }

    fn start_with(config: &str, normalize_path: bool) -> Gateway {
        let upstream = Upstream::start();
        let mut opts = EnvoyOptions::new(Some(config), upstream.port());
        opts.normalize_path = normalize_path;
        let envoy = Envoy::start(&opts);
        Gateway { upstream, envoy, normalize: normalize_path }
    }

    /// Checks `reply` and what the upstream saw; returns the forwarded request, if any.
    fn check(&self, what: &str, reply: &Response, expected: Outcome) -> Option<Recorded> {
        let seen = self.upstream.requests();
        self.upstream.clear();
        match expected {
            Allowed(id) => {
                assert_eq!(reply.status, 200, "{what}: {}", reply.body);
                let [req] = seen.as_slice() else { panic!("{what}: upstream saw {seen:#?}") };
                let ids: Vec<String> = id.iter().map(|s| s.to_string()).collect();
                assert_eq!(req.header_values("x-api-key-id"), ids, "{what}");
                assert_no_credential_or_forgery(what, req);
                Some(req.clone())
            }
            Refused(status, code) => {
                assert_eq!(reply.status, status, "{what}: {}", reply.body);
                let body: Value =
                    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{what}: {e}: {}", reply.body));
                assert_eq!(body["error"], code, "{what}");
                assert!(seen.is_empty(), "{what}: the upstream received {seen:#?}");
                None
            }
        }
    }

    fn expect(&self, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)], expected: Outcome) {
        let reply = common::send(self.envoy.port(), proto, method, path, headers);
        self.check(
            &format!("{proto:?} normalize_path={} {method} {path} {headers:?}", self.normalize),
            &reply,
            expected,
        );
    }
}

/// A name as CGI, WSGI and Rack read it (`x_org_id` and `X-Org-Id` are both `HTTP_X_ORG_ID`), and
/// lighttpd, which takes every character but letters and digits as `_` (`x.org.id` too).
fn cgi(name: &str) -> String {
    let upper: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("HTTP_{upper}")
}

/// No header that a CGI-style reader takes for a credential carries a key, and each identity header
/// comes once, as keygate set it, in its own spelling only.
fn assert_no_credential_or_forgery(what: &str, req: &Recorded) {
    for (name, value) in &req.headers {
        let as_cgi = cgi(name);
        if as_cgi == cgi("authorization") || as_cgi == cgi("x-api-key") {
            assert!(!value.contains("sk_live_"), "{what}: {name} reaches the upstream with a key");
        }
    }
    for identity in ["x-org-id", "x-api-key-id", "x-api-key-scopes", "x-venue-id"] {
        let copies: Vec<&(String, String)> = req.headers.iter().filter(|(n, _)| cgi(n) == cgi(identity)).collect();
        assert!(copies.len() <= 1, "{what}: {identity} arrives as {copies:?}");
        if let Some((name, value)) = copies.first() {
            assert_eq!(name, identity, "{what}: {identity} spelled {name}");
            assert!(!value.contains("evil"), "{what}: a forged {identity}: {value}");
        }
    }
}

fn for_each_gateway(test: impl Fn(&Gateway, Proto)) {
    for normalize in [false, true] {
        let g = Gateway::start(normalize);
        for proto in Proto::ALL {
            test(&g, proto);
        }
    }
}

#[test]
fn a_method_in_any_case_needs_what_its_upper_case_route_needs() {
    let g = Gateway::start(false);
    // HTTP/2 carries `:method` as sent; Werkzeug and Django upper-case it and serve their GET handler.
    for method in ["get", "GeT", "gET"] {
        g.expect(
            Proto::Http2,
            method,
            "/v1/venues/v_7/treatments",
            &[("x-api-key", PLATFORM)],
            Refused(403, "insufficient_scope"),
        );
        g.expect(Proto::Http2, method, "/v1/venues/v_8/treatments", &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        g.expect(Proto::Http2, method, "/v1/venues/v_7/treatments", &[("x-api-key", VENUE)], Allowed(Some("0000aaaa")));
    }
    // HTTP/1.1: Envoy either refuses a lower-case method itself or hands it to keygate as sent.
    for method in ["get", "GeT"] {
        let reply =
            common::send(g.envoy.port(), Proto::Http1, method, "/v1/venues/v_7/treatments", &[("x-api-key", PLATFORM)]);
        if reply.status == 400 {
            assert!(g.upstream.requests().is_empty(), "HTTP/1.1 {method}");
        } else {
            g.check(&format!("HTTP/1.1 {method}"), &reply, Refused(403, "insufficient_scope"));
        }
    }
}

#[test]
fn path_parameters_reach_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // Tomcat, Jetty and Spring strip `;…` from every segment and read `..;` as `..`.
        for path in ["/docs/..;/v1/venues/v_8/treatments", "/docs/a/..;x=1/..;/v1/venues/v_8/treatments"] {
            g.expect(proto, "GET", path, &[], Refused(401, "missing_api_key"));
            g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        }
        for path in [
            "/v1/venues/v_7/..;/v_8/x",
            "/v1/venues;x=1/v_8/treatments",
            "/v1/venues/v_8;x=1/treatments",
            "/v1/venues/v_7/.;/..;/v_8/treatments",
            "/v1/venues/v_7%3B/..%3B/v_8/x",
        ] {
            g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        }
        for path in ["/v1/venues/v_7/treatments;x=1", "/v1/venues;/v_7/treatments", "/v1/venues/v_7/x/..;/treatments"] {
            g.expect(proto, "GET", path, &[("x-api-key", PLATFORM)], Refused(403, "insufficient_scope"));
        }
        g.expect(
            proto,
            "GET",
            "/v1/venues/v_7/treatments;jsessionid=1",
            &[("x-api-key", VENUE)],
            Allowed(Some("0000aaaa")),
        );
        g.expect(proto, "GET", "/docs/a;v=1/b", &[], Allowed(None));
    });
}

#[test]
fn a_backslash_walk_back_reaches_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // To keygate's normal form `\` is a separator, and `\..` walks back into /docs/**; nginx,
        // Apache, Jetty and Go split on `/` alone and read the treatments route.
        for path in [
            "/docs/../v1/venues/v_8/y\\..\\..\\..\\..\\docs\\a\\b/../treatments",
            "/docs/../v1/venues/v_8/y%5C..%5C..%5C..%5C..%5Cdocs%5Ca%5Cb/../treatments",
        ] {
            if proto == Proto::Http2 && path.contains('\\') {
                continue; // the h2 crate refuses a raw backslash in :path
            }
            if g.normalize && path.contains('\\') {
                // Envoy takes `\` as `/` and resolves the dots itself: the upstream is asked for
                // /docs/a/treatments, which is public. (`%5C` it leaves as it is.)
                let reply = common::send(g.envoy.port(), proto, "GET", path, &[]);
                let req = g.check(&format!("{proto:?} normalized {path}"), &reply, Allowed(None)).unwrap();
                assert_eq!(req.path, "/docs/a/treatments");
                continue;
            }
            g.expect(proto, "GET", path, &[], Refused(401, "missing_api_key"));
            g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        }
    });
}

#[test]
fn a_case_variant_of_a_path_needs_what_the_path_needs() {
    for_each_gateway(|g, proto| {
        // Express and ASP.NET Core route `/V1/venues` to the `/v1/venues` handler.
        // U+017F folds onto `s` (.NET, Java).
        for path in ["/V1/venues/v_8/treatments", "/v1/VENUES/v_8/Treatments", "/v1/venue%C5%BF/v_8/treatments"] {
            g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
            g.expect(proto, "GET", path, &[("x-api-key", PLATFORM)], Refused(403, "insufficient_scope"));
        }
        // A captured value is compared as sent.
        g.expect(proto, "GET", "/v1/venues/V_7/treatments", &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        g.expect(proto, "GET", "/V1/Venues/v_7/Treatments", &[("x-api-key", VENUE)], Allowed(Some("0000aaaa")));
        // `/DOCS/x` is not `/docs/x` to a case-sensitive upstream: it is no public route.
        g.expect(proto, "GET", "/DOCS/x", &[], Refused(401, "missing_api_key"));
    });
}

#[test]
fn a_joined_authorization_never_carries_a_key_upstream() {
    for_each_gateway(|g, proto| {
        let joined = format!("Basic eA==, Bearer {VENUE}");
        let joined_after = format!("Bearer {VENUE}, Basic eA==");
        for value in [&joined, &joined_after] {
            // The deciding header: a list with a Bearer key in it is no usable credential.
            g.expect(proto, "GET", "/v1/venues/v_7/x", &[("authorization", value)], Refused(401, "invalid_api_key"));
            // Public route: stripped.
            g.expect(proto, "GET", "/docs/x", &[("authorization", value)], Allowed(None));
            // X-API-Key decides: the joined Authorization is stripped all the same.
            g.expect(
                proto,
                "GET",
                "/v1/venues/v_7/x",
                &[("x-api-key", PLATFORM), ("authorization", value)],
                Allowed(Some("0000bbbb")),
            );
        }
        // Two copies, as a client sends them (Envoy may join them before keygate sees them).
        let two = [("authorization", "Basic eA=="), ("authorization", &*format!("Bearer {VENUE}"))];
        let reply = common::send(g.envoy.port(), proto, "GET", "/docs/x", &two);
        g.check(&format!("{proto:?} two Authorization copies on a public route"), &reply, Allowed(None));
    });
}

#[test]
fn underscore_spellings_of_identity_headers_never_reach_the_upstream() {
    for_each_gateway(|g, proto| {
        let forged = [
            ("x_org_id", "evil"),
            ("X_Org_Id", "evil_2"),
            ("x_api_key_id", "evil_root"),
            ("x-api_key-scopes", "evil *"),
            ("x_venue_id", "evil_v_1"),
            ("x_api_key", "sk_live_evil"),
            ("x.org.id", "evil_dot"),
            ("x~venue~id", "evil_tilde"),
            ("x.api.key", "sk_live_evil_dot"),
        ];
        for (path, key, id) in [
            ("/docs/x", None, None),
            ("/v1/venues/v_7/x", Some(PLATFORM), Some("0000bbbb")),
            ("/v1/venues/v_7/treatments", Some(VENUE), Some("0000aaaa")),
        ] {
            let mut headers: Vec<(&str, &str)> = forged.to_vec();
            if let Some(key) = key {
                headers.push(("x-api-key", key));
            }
            let reply = common::get(g.envoy.port(), proto, path, &headers);
            let req = g.check(&format!("{proto:?} {path} with underscore twins"), &reply, Allowed(id)).unwrap();
            for (name, _) in &req.headers {
                let odd = name.chars().any(|c| c != '-' && !c.is_ascii_alphanumeric());
                assert!(!odd, "{proto:?} {path}: {name} reached the upstream");
            }
            if key.is_some() {
                assert_eq!(req.header_values("x-org-id"), ["org_42"], "{proto:?} {path}");
            }
        }
        // Other underscore headers are not keygate's to remove.
        let reply = common::get(g.envoy.port(), proto, "/docs/x", &[("x_trace_id", "1")]);
        let req = g.check("an unrelated underscore header", &reply, Allowed(None)).unwrap();
        assert_eq!(req.header_values("x_trace_id"), ["1"]);
    });
}

#[test]
fn a_method_override_a_url_override_or_a_nul_byte_reaches_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // Express's method-override, Symfony and Laravel serve a POST with an override as that method.
        for (headers, path) in [
            (vec![("x-http-method-override", "GET")], "/v1/venues/v_7/treatments"),
            (vec![("x-http-method", "get")], "/v1/venues/v_7/treatments"),
            (vec![], "/v1/venues/v_7/treatments?_method=GET"),
        ] {
            let mut headers = headers.clone();
            headers.push(("x-api-key", PLATFORM));
            g.expect(proto, "POST", path, &headers, Refused(403, "insufficient_scope"));
        }
        // IIS's URL Rewrite and Symfony route by X-Original-URL / X-Rewrite-URL.
        g.expect(
            proto,
            "GET",
            "/docs/x",
            &[("x-original-url", "/v1/venues/v_8/treatments")],
            Refused(401, "missing_api_key"),
        );
        g.expect(
            proto,
            "GET",
            "/v1/venues/v_7/x",
            &[("x-rewrite-url", "/v1/venues/v_8/x"), ("x-api-key", VENUE)],
            Refused(403, "forbidden"),
        );
        // A server that ends the path at a decoded NUL reads the treatments route. Envoy's own
        // normalisation refuses `%00` with a 400 before keygate runs.
        let path = "/v1/venues/v_7/treatments%00/../../../../docs/x";
        let reply = common::send(g.envoy.port(), proto, "GET", path, &[("x-api-key", PLATFORM)]);
        let what = format!("{proto:?} normalize_path={} GET {path}", g.normalize);
        if g.normalize && reply.status == 400 {
            assert!(g.upstream.requests().is_empty(), "{what}");
        } else {
            g.check(&what, &reply, Refused(403, "insufficient_scope"));
        }
    });
}

#[test]
fn rfc_dot_removal_and_kept_encoded_slashes_reach_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // RFC 3986's dot removal (ASP.NET Core, Envoy's own normalize_path, WHATWG URLs) keeps empty
        // segments, so `//..` removes only the empty one: /v1/venues/v_8/treatments/docs/x to them.
        let path = "/docs/../v1/venues/v_8/treatments//..//..//..//../docs/x";
        g.expect(proto, "GET", path, &[], Refused(401, "missing_api_key"));
        g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
        // Kept encoded, `a%2F..%2F…` is one segment, and the final `..` removes it alone:
        // /v1/venues/v_7/treatments/ to ASP.NET Core and Envoy's normalize_path.
        let path = "/v1/venues/v_7/treatments/a%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fx/..";
        g.expect(proto, "GET", path, &[("x-api-key", PLATFORM)], Refused(403, "insufficient_scope"));
        // Go's ServeMux decodes each segment: `%76enues` is `venues`, `v_7%2Fx` is one segment.
        let path = "/v1/%76enues/v_7%2Fx/treatments";
        g.expect(proto, "GET", path, &[("x-api-key", PLATFORM)], Refused(403, "insufficient_scope"));
        // nginx decodes and resolves, then the application decodes and resolves the rest again:
        // /v1/venues/zz/docs, venue `zz`.
        let path = "/v1/zz/%252e%252e/venues/zz/%252e%252e/v_8/q%2F..%2F..%2F..%2Fdocs%2Fa/..";
        g.expect(proto, "GET", path, &[("x-api-key", VENUE)], Refused(403, "forbidden"));
    });
}

#[test]
fn a_leading_double_slash_read_as_an_authority_reaches_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // Node's `new URL(req.url, base)` takes `//docs` for a host: the path is then the treatments
        // route's. Envoy's merge_slashes makes it /docs/v1/…, which every upstream reads as public.
        for path in ["//docs/v1/venues/v_8/treatments", "/\\docs/v1/venues/v_8/treatments"] {
            if proto == Proto::Http2 && path.contains('\\') {
                continue; // the h2 crate refuses a raw backslash in :path
            }
            let reply = common::send(g.envoy.port(), proto, "GET", path, &[("x-api-key", VENUE)]);
            let what = format!("{proto:?} normalize_path={} GET {path}", g.normalize);
            if g.normalize {
                let req = g.check(&what, &reply, Allowed(None)).unwrap();
                assert_eq!(req.path, "/docs/v1/venues/v_8/treatments", "{what}");
            } else {
                g.check(&what, &reply, Refused(403, "forbidden"));
            }
        }
    });
}

#[test]
fn a_percent_u_escape_reaches_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // IIS decodes `%u002e` to `.` and resolves: /v1/venues/v_8/treatments.
        let path = "/docs/%u002e%u002e/v1/venues/v_8/treatments";
        for (key, expected) in [(None, Refused(401, "missing_api_key")), (Some(VENUE), Refused(403, "forbidden"))] {
            let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let reply = common::send(g.envoy.port(), proto, "GET", path, &headers);
            let what = format!("{proto:?} normalize_path={} GET {path}", g.normalize);
            if reply.status == 400 {
                assert!(g.upstream.requests().is_empty(), "{what}"); // Envoy refused it itself
            } else {
                g.check(&what, &reply, expected);
            }
        }
    });
}

/// keygate's Envoy with `normalize_path` off in front of a second Envoy that normalises (as an
/// Istio sidecar does), in front of the recording upstream: the second Envoy is an RFC 3986 reader.
#[test]
fn a_normalising_proxy_behind_keygate_reads_no_path_keygate_did_not_authorise() {
    let upstream = Upstream::start();
    let mut inner = EnvoyOptions::new(None, upstream.port());
    inner.normalize_path = true;
    let inner = Envoy::start(&inner);
    let envoy = Envoy::start(&EnvoyOptions::new(Some(&config()), inner.port()));
    let g = Gateway { upstream, envoy, normalize: false };
    for proto in Proto::ALL {
        for (path, key, expected) in [
            ("/docs/../v1/venues/v_8/treatments//..//..//..//../docs/x", None, Refused(401, "missing_api_key")),
            ("/docs/../v1/venues/v_8/treatments//..//..//..//../docs/x", Some(VENUE), Refused(403, "forbidden")),
            (
                "/v1/venues/v_7/treatments/a%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fx/..",
                Some(PLATFORM),
                Refused(403, "insufficient_scope"),
            ),
        ] {
            let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            g.expect(proto, "GET", path, &headers, expected);
        }
        // What the second Envoy makes of them, for a key that may have both readings.
        let path = "/v1/venues/v_7/treatments/a%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fx/..";
        let reply = common::send(g.envoy.port(), proto, "GET", path, &[("x-api-key", VENUE)]);
        let req = g.check(&format!("{proto:?} {path}"), &reply, Allowed(Some("0000aaaa"))).unwrap();
        assert_eq!(req.path, "/v1/venues/v_7/treatments/");
    }
}

#[test]
fn an_override_in_any_spelling_reaches_no_route_with_less_than_it_needs() {
    for_each_gateway(|g, proto| {
        // Envoy passes underscore headers by default; Symfony reads `x_http_method_override` as
        // X-HTTP-Method-Override, and PHP reads `_%6Dethod`, `.method` and `+_method` as `_method`.
        for (headers, path) in [
            (vec![("x_http_method_override", "GET")], "/v1/venues/v_7/treatments"),
            (vec![("x.http.method", "GET")], "/v1/venues/v_7/treatments"),
            (vec![], "/v1/venues/v_7/treatments?_%6Dethod=GET"),
            (vec![], "/v1/venues/v_7/treatments?.method=GET"),
            (vec![], "/v1/venues/v_7/treatments?+_method=GET"),
        ] {
            let mut headers = headers.clone();
            headers.push(("x-api-key", PLATFORM));
            g.expect(proto, "POST", path, &headers, Refused(403, "insufficient_scope"));
        }
        g.expect(
            proto,
            "GET",
            "/docs/x",
            &[("x_original_url", "/v1/venues/v_8/treatments")],
            Refused(401, "missing_api_key"),
        );
    });
}

#[test]
fn a_key_in_a_basic_credential_never_reaches_the_upstream() {
    for_each_gateway(|g, proto| {
        // base64 of `<key>:`, as `curl -u <key>:` sends it to an API in Stripe's style.
        let basic = format!("Basic {}", base64(&format!("{VENUE}:")));
        for (path, headers, id) in [
            ("/docs/x", vec![("authorization", basic.as_str())], None),
            ("/v1/venues/v_7/x", vec![("x-api-key", PLATFORM), ("authorization", basic.as_str())], Some("0000bbbb")),
        ] {
            let reply = common::send(g.envoy.port(), proto, "GET", path, &headers);
            let req = g.check(&format!("{proto:?} {path} with a Basic key"), &reply, Allowed(id)).unwrap();
            assert!(!req.has_header("authorization"), "{proto:?} {path}: {:?}", req.header_values("authorization"));
        }
        // A Basic credential without a key is the upstream's.
        let reply = common::get(g.envoy.port(), proto, "/docs/x", &[("authorization", "Basic dXNlcjpwYXNz")]);
        let req = g.check("a plain Basic credential", &reply, Allowed(None)).unwrap();
        assert_eq!(req.header_values("authorization"), ["Basic dXNlcjpwYXNz"]);
    });
}

#[test]
fn a_head_request_needs_what_its_get_needs_under_an_earlier_head_route() {
    let mut config: Value = serde_json::from_str(&config()).unwrap();
    let head = json!({"methods": ["HEAD"], "path": "/v1/**", "public": true});
    config["routes"].as_array_mut().unwrap().insert(0, head);
    let g = Gateway::start_with(&config.to_string(), false);
    for proto in Proto::ALL {
        // The upstream answers HEAD with its GET handler: the treatments reply's headers.
        // A reply to HEAD has no body: the status tells the refusal.
        for (path, key, status) in
            [("/v1/venues/v_7/treatments", None, 401), ("/v1/venues/v_8/treatments", Some(VENUE), 403)]
        {
            let headers: Vec<(&str, &str)> = key.map(|k| ("x-api-key", k)).into_iter().collect();
            let reply = common::send(g.envoy.port(), proto, "HEAD", path, &headers);
            assert_eq!(reply.status, status, "{proto:?} HEAD {path}");
            assert!(g.upstream.requests().is_empty(), "{proto:?} HEAD {path}: {:#?}", g.upstream.requests());
        }
        g.expect(proto, "HEAD", "/v1/venues/v_7/treatments", &[("x-api-key", VENUE)], Allowed(Some("0000aaaa")));
    }
}

/// Standard base64 with padding.
fn base64(text: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in text.as_bytes().chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            let c = if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' };
            out.push(c);
        }
    }
    out
}
