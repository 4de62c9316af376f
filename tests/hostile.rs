//! Hostile requests against a real Envoy, over HTTP/1.1 and HTTP/2: each attack with the outcome it
//! must get written beside it. On every refusal nothing reaches the upstream, and no secret ever
//! appears in keygate's log.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Envoy, EnvoyOptions, Proto, Recorded, Response, Upstream};
use keygate_core::keys::hash_key;
use serde_json::{json, Value};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const VENUE: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const PLATFORM: &str = "sk_live_0000bbbb_2222222222222222222222222222222222222222222222222222222222222222";
const REVOKED: &str = "sk_live_0000cccc_3333333333333333333333333333333333333333333333333333333333333333";
const WRONG_SECRET: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111112";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

fn config(keys: Value) -> String {
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": keys,
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
             "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    })
    .to_string()
}

fn keys() -> Value {
    json!([
        {"id": "0000aaaa", "hash": hash(VENUE), "org": "org_42", "scopes": ["venues:read", "treatments:read"],
         "attributes": {"venue": "v_7"}},
        {"id": "0000bbbb", "hash": hash(PLATFORM), "org": "org_42", "scopes": ["venues:read"]},
        {"id": "0000cccc", "hash": hash(REVOKED), "org": "org_42", "scopes": ["venues:read"], "revoked": true}
    ])
}

/// What a hostile request must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Forwarded, with this key id in `x-api-key-id`.
    Allowed(&'static str),
    /// Refused with this status and body `error` code; nothing forwarded.
    Refused(u16, &'static str),
}

use Outcome::{Allowed, Refused};

/// One hostile request: what it is, its headers, and what it must get.
type Case = (&'static str, Vec<(&'static str, String)>, Outcome);

struct Gateway {
    upstream: Upstream,
    envoy: Envoy,
}

impl Gateway {
    fn start(keys: Value) -> Gateway {
        let upstream = Upstream::start();
        let envoy = Envoy::start(&EnvoyOptions::new(Some(&config(keys)), upstream.port()));
        Gateway { upstream, envoy }
    }

    fn check(&self, what: &str, reply: Response, expected: Outcome) {
        let seen: Vec<Recorded> = self.upstream.requests();
        self.upstream.clear();
        match expected {
            Allowed(id) => {
                assert_eq!(reply.status, 200, "{what}: {}", reply.body);
                let [req] = seen.as_slice() else { panic!("{what}: upstream saw {seen:#?}") };
                assert_eq!(req.header_values("x-api-key-id"), [id], "{what}");
                for name in ["authorization", "x-api-key"] {
                    assert!(!req.has_header(name), "{what}: {name} reached the upstream");
                }
            }
            Refused(status, code) => {
                assert_eq!(reply.status, status, "{what}: {}", reply.body);
                let body: Value =
                    serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{what}: {e}: {}", reply.body));
                assert_eq!(body["error"], code, "{what}");
                assert!(seen.is_empty(), "{what}: the upstream received {seen:#?}");
            }
        }
    }

    fn expect(&self, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)], expected: Outcome) {
        let reply = common::send(self.envoy.port(), proto, method, path, headers);
        self.check(&format!("{proto:?} {method} {path} {headers:?}"), reply, expected);
    }

    /// No secret of any key used in these tests appears in keygate's own log.
    fn assert_no_secret_logged(&self) {
        let _ = self.envoy.flushed_log();
        let log = self.envoy.keygate_log();
        for key in [VENUE, PLATFORM, REVOKED, WRONG_SECRET] {
            let secret = key.rsplit('_').next().unwrap();
            assert!(!log.contains(secret), "a secret appears in keygate's log");
        }
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[test]
fn hostile_credentials_get_their_documented_outcome() {
    let g = Gateway::start(keys());
    let long = format!("Bearer sk_live_{}", "a".repeat(8 * 1024));
    let cases: Vec<Case> = vec![
        ("no header", vec![], Refused(401, "missing_api_key")),
        ("Bearer with nothing after it", vec![("authorization", "Bearer".into())], Refused(401, "missing_api_key")),
        ("Bearer and spaces only", vec![("authorization", "Bearer    ".into())], Refused(401, "missing_api_key")),
        ("another scheme", vec![("authorization", "Basic dXNlcjpwYXNz".into())], Refused(401, "missing_api_key")),
        ("lower-case bearer", vec![("authorization", format!("bearer {VENUE}"))], Allowed("0000aaaa")),
        ("upper-case BEARER", vec![("authorization", format!("BEARER {VENUE}"))], Allowed("0000aaaa")),
        ("several spaces before the key", vec![("authorization", format!("Bearer     {VENUE}"))], Allowed("0000aaaa")),
        ("a tab after Bearer", vec![("authorization", format!("Bearer\t{VENUE}"))], Refused(401, "invalid_api_key")),
        (
            "trailing junk after the key",
            vec![("authorization", format!("Bearer {VENUE} junk"))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "two Authorization headers",
            vec![("authorization", bearer(VENUE)), ("authorization", bearer(PLATFORM))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "the same key twice in two Authorization headers",
            vec![("authorization", bearer(VENUE)), ("authorization", bearer(VENUE))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "two comma-separated credentials in one header",
            vec![("authorization", format!("Bearer {VENUE}, Bearer {PLATFORM}"))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "Authorization and X-API-Key: Authorization takes precedence",
            vec![("x-api-key", PLATFORM.into()), ("authorization", bearer(VENUE))],
            Allowed("0000aaaa"),
        ),
        (
            "a bad Authorization key is not rescued by a good X-API-Key",
            vec![("authorization", bearer(WRONG_SECRET)), ("x-api-key", PLATFORM.into())],
            Refused(401, "invalid_api_key"),
        ),
        (
            "a repeated X-API-Key",
            vec![("x-api-key", PLATFORM.into()), ("x-api-key", PLATFORM.into())],
            Refused(401, "invalid_api_key"),
        ),
        (
            "a key in a cookie only",
            vec![("cookie", format!("api_key={VENUE}; x-api-key={VENUE}"))],
            Refused(401, "missing_api_key"),
        ),
        ("an 8 KiB key", vec![("authorization", long)], Refused(401, "invalid_api_key")),
        (
            "a wrong prefix",
            vec![("authorization", bearer(&VENUE.replace("sk_live_", "sk_test_")))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "a wrong-case prefix",
            vec![("authorization", bearer(&VENUE.replace("sk_live_", "SK_LIVE_")))],
            Refused(401, "invalid_api_key"),
        ),
        (
            "a real id with a wrong secret",
            vec![("authorization", bearer(WRONG_SECRET))],
            Refused(401, "invalid_api_key"),
        ),
        ("a revoked key", vec![("authorization", bearer(REVOKED))], Refused(401, "invalid_api_key")),
        (
            "a valid key lacking the route's scope",
            vec![("x-api-key", PLATFORM.into())],
            Refused(403, "insufficient_scope"),
        ),
    ];
    for proto in Proto::ALL {
        for (what, headers, expected) in &cases {
            let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let reply = common::send(g.envoy.port(), proto, "GET", "/v1/venues/v_7/treatments", &headers);
            g.check(&format!("{proto:?}: {what}"), reply, *expected);
        }
        g.expect(
            proto,
            "GET",
            &format!("/v1/venues/v_7/treatments?api_key={VENUE}"),
            &[],
            Refused(401, "missing_api_key"),
        );
        let body = format!("{{\"api_key\": \"{VENUE}\"}}");
        let reply = common::send_body(
            g.envoy.port(),
            proto,
            "POST",
            "/v1/venues/v_7/notes",
            &[("content-type", "application/json")],
            body.as_bytes(),
        );
        g.check(&format!("{proto:?}: a key in the body only"), reply, Refused(401, "missing_api_key"));
    }
    g.assert_no_secret_logged();
}

#[test]
fn unknown_key_and_wrong_secret_get_byte_identical_replies() {
    let g = Gateway::start(keys());
    for proto in Proto::ALL {
        let unknown = common::get(
            g.envoy.port(),
            proto,
            "/v1/venues/v_7/x",
            &[("authorization", &bearer(&WRONG_SECRET.replace("0000aaaa", "0000ffff")))],
        );
        let wrong = common::get(g.envoy.port(), proto, "/v1/venues/v_7/x", &[("authorization", &bearer(WRONG_SECRET))]);
        let revoked = common::get(g.envoy.port(), proto, "/v1/venues/v_7/x", &[("authorization", &bearer(REVOKED))]);
        for other in [&wrong, &revoked] {
            assert_eq!((other.status, &other.body), (unknown.status, &unknown.body));
            assert_eq!(other.header("www-authenticate"), unknown.header("www-authenticate"));
        }
    }
}

#[test]
fn bytes_outside_visible_ascii_are_refused() {
    let g = Gateway::start(keys());
    // Raw HTTP/1.1, so the bytes reach Envoy exactly as written.
    for (what, value) in [
        ("a UTF-8 letter in the key", format!("Bearer {}é", &VENUE[..VENUE.len() - 1]).into_bytes()),
        ("a raw 0xFF byte in the key", [b"Bearer sk_live_0000aaaa_".as_slice(), &[0xff]].concat()),
        ("a DEL byte in the key", [b"Bearer sk_live_0000aaaa_".as_slice(), &[0x7f]].concat()),
    ] {
        let mut request = b"GET /v1/venues/v_7/treatments HTTP/1.1\r\nhost: x\r\nauthorization: ".to_vec();
        request.extend_from_slice(&value);
        request.extend_from_slice(b"\r\n\r\n");
        match common::try_raw_http1(g.envoy.port(), &request) {
            // Envoy may refuse some bytes itself (400) before keygate runs; either way nothing passes.
            Ok(reply) if reply.status == 400 => assert!(g.upstream.requests().is_empty(), "{what}"),
            Ok(reply) => g.check(what, reply, Refused(401, "invalid_api_key")),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[test]
fn key_works_until_its_expiry_instant_and_not_after() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let expires = now + 6; // Envoy starts well within it, even on a loaded machine
    let g = Gateway::start(json!([{"id": "0000aaaa", "hash": hash(VENUE), "org": "org_42",
                                   "scopes": ["venues:read", "treatments:read"], "expires_at": expires}]));
    let at = |t: u64| {
        let target = UNIX_EPOCH + Duration::from_secs(t);
        if let Ok(wait) = target.duration_since(SystemTime::now()) {
            std::thread::sleep(wait);
        }
    };
    at(expires - 1); // one second before
    for proto in Proto::ALL {
        g.expect(proto, "GET", "/v1/venues/v_7/treatments", &[("x-api-key", VENUE)], Allowed("0000aaaa"));
    }
    at(expires + 1); // one second after
    for proto in Proto::ALL {
        g.expect(proto, "GET", "/v1/venues/v_7/treatments", &[("x-api-key", VENUE)], Refused(401, "expired_api_key"));
    }
}

#[test]
fn venue_restricted_key_cannot_reach_another_venue_by_any_spelling() {
    let g = Gateway::start(keys());
    let auth = bearer(VENUE);
    for proto in Proto::ALL {
        g.expect(proto, "GET", "/v1/venues/v_7/treatments", &[("authorization", &auth)], Allowed("0000aaaa"));
        for path in [
            "/v1/venues/v_8/treatments",
            "/v1/venues/v_7/../v_8/treatments",
            "/v1/venues/v_7/%2e%2e/v_8/treatments",
            "/v1/venues/v_7/%2E%2E/v_8/treatments",
            "/v1/venues/v_7%2F..%2Fv_8/treatments",
            "/v1/venues/v_7%2f..%2fv_8/treatments",
            "/v1/venues/v_7/..%2Fv_8/treatments",
            "//v1//venues//v_8//treatments",
            "/v1/venues/v_8/treatments/",
            "/v1/venues/v_8/treatments//",
            "/v1/venues/v_8/./treatments",
            "/v1/venues/v_8%2Ftreatments",
            "/v1/%76enues/v_8/treatments",
            "/v1/venues/v_8/x/../../../healthz",
        ] {
            g.expect(proto, "GET", path, &[("authorization", &auth)], Refused(403, "forbidden"));
        }
    }
}

#[test]
fn spoofed_identity_headers_never_reach_the_upstream() {
    let g = Gateway::start(keys());
    let spoofs = [
        ("X-Org-Id", "org_evil"),
        ("x-org-id", "org_evil_2"),
        ("X-API-KEY-ID", "root"),
        ("x-api-key-id", "root_2"),
        ("X-Api-Key-Scopes", "*"),
        ("x-api-key-scopes", "admin"),
        ("x-venue-id", "v_1"),
        ("X-VENUE-ID", "v_2"),
    ];
    for proto in Proto::ALL {
        for (path, key) in
            [("/healthz", None), ("/v1/venues/v_7/x", Some(PLATFORM)), ("/v1/venues/v_7/treatments", Some(VENUE))]
        {
            let auth = key.map(bearer);
            let mut headers: Vec<(&str, &str)> = spoofs.to_vec();
            if let Some(auth) = &auth {
                headers.push(("authorization", auth));
            }
            let reply = common::get(g.envoy.port(), proto, path, &headers);
            assert_eq!(reply.status, 200, "{proto:?} {path}");
            let req = g.upstream.single_request();
            g.upstream.clear();
            let expect: &[(&str, Option<&str>)] = match key {
                None => &[("x-org-id", None), ("x-api-key-id", None), ("x-api-key-scopes", None), ("x-venue-id", None)],
                Some(PLATFORM) => &[
                    ("x-org-id", Some("org_42")),
                    ("x-api-key-id", Some("0000bbbb")),
                    ("x-api-key-scopes", Some("venues:read")),
                    ("x-venue-id", None),
                ],
                Some(_) => &[
                    ("x-org-id", Some("org_42")),
                    ("x-api-key-id", Some("0000aaaa")),
                    ("x-api-key-scopes", Some("venues:read treatments:read")),
                    ("x-venue-id", Some("v_7")),
                ],
            };
            for (name, value) in expect {
                let got = req.header_values(name);
                let want: Vec<String> = value.iter().map(|v| v.to_string()).collect();
                assert_eq!(got, want, "{proto:?} {path}: {name}");
            }
        }
    }
}

#[test]
fn empty_key_set_refuses_every_key() {
    let g = Gateway::start(json!([]));
    for proto in Proto::ALL {
        g.expect(
            proto,
            "GET",
            "/v1/venues/v_7/x",
            &[("authorization", &bearer(VENUE))],
            Refused(401, "invalid_api_key"),
        );
        g.expect(proto, "GET", "/v1/venues/v_7/x", &[], Refused(401, "missing_api_key"));
        let reply = common::get(g.envoy.port(), proto, "/healthz", &[]);
        assert_eq!(reply.status, 200, "a public route still serves");
        g.upstream.clear();
    }
}

#[test]
fn a_connection_header_naming_identity_headers_neither_forges_nor_drops_them() {
    let g = Gateway::start(keys());
    // Envoy drops `connection` itself; the headers it names are keygate's to remove and set.
    for (path, key, org) in [("/healthz", None, None), ("/v1/venues/v_7/x", Some(PLATFORM), Some("org_42"))] {
        let key = key.map(|k| format!("x-api-key: {k}\r\n")).unwrap_or_default();
        let request = format!(
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: keep-alive, x-org-id, x-api-key-id\r\n\
             x-org-id: evil\r\n{key}\r\n"
        );
        let reply = common::raw_http1(g.envoy.port(), request.as_bytes());
        assert_eq!(reply.status, 200, "{path}: {}", reply.body);
        let req = g.upstream.single_request();
        g.upstream.clear();
        assert!(!req.has_header("connection"), "{path}: {:?}", req.header_values("connection"));
        let want: Vec<String> = org.iter().map(|o| o.to_string()).collect();
        assert_eq!(req.header_values("x-org-id"), want, "{path}");
    }
}

#[test]
fn a_request_with_too_much_path_to_read_every_way_is_refused() {
    let g = Gateway::start(keys());
    // keygate reads a path not in normal form in every way an upstream might; 8 KiB of such paths
    // per request (with the URL-override headers) bounds that work.
    let odd = format!("/v1/venues/v_7/{}x", "a/..%2F".repeat(1200));
    let within = format!("/v1/venues/v_7/{}x", "a/..%2F".repeat(1000));
    for proto in Proto::ALL {
        g.expect(proto, "GET", &odd, &[("x-api-key", PLATFORM)], Refused(403, "forbidden"));
        g.expect(proto, "GET", &within, &[("x-api-key", PLATFORM)], Allowed("0000bbbb"));
        let overrides = [("x-original-url", within.as_str()), ("x-api-key", PLATFORM)];
        g.expect(proto, "GET", &within, &overrides, Refused(403, "forbidden"));
        // A long path in normal form is read as it is.
        let plain = format!("/v1/venues/v_7/{}", "a/".repeat(6000));
        g.expect(proto, "GET", &plain, &[("x-api-key", PLATFORM)], Allowed("0000bbbb"));
    }
}

#[test]
fn connect_and_an_asterisk_target_reach_no_upstream() {
    let g = Gateway::start(keys());
    for request in [
        "CONNECT 127.0.0.1:1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\n\r\n".to_string(),
        format!("CONNECT 127.0.0.1:1 HTTP/1.1\r\nhost: 127.0.0.1:1\r\nx-api-key: {PLATFORM}\r\n\r\n"),
        format!("OPTIONS * HTTP/1.1\r\nhost: x\r\nx-api-key: {PLATFORM}\r\n\r\n"),
    ] {
        let reply = common::raw_http1(g.envoy.port(), request.as_bytes());
        assert!(reply.status >= 400, "{request:?}: {}", reply.status);
        assert!(g.upstream.requests().is_empty(), "{request:?}: {:#?}", g.upstream.requests());
    }
}

/// Raw HTTP/2 frames, for what the h2 crate will not send: a `#`, a control byte or an upper-case
/// header name. Returns the `:status` of the reply (`None` for a reset stream or connection).
fn raw_h2(port: u16, path: &[u8], header: (&[u8], &[u8])) -> Option<u16> {
    use std::io::{Read, Write};
    let frame = |kind: u8, flags: u8, stream: u32, payload: &[u8]| {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    };
    // HPACK literals without indexing and without Huffman coding, names and values under 127 bytes.
    let mut block = Vec::new();
    for (name, value) in
        [(&b":method"[..], &b"GET"[..]), (b":scheme", b"http"), (b":authority", b"x"), (b":path", path), header]
    {
        block.extend([0u8, name.len() as u8]);
        block.extend(name);
        block.push(value.len() as u8);
        block.extend(value);
    }
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    s.write_all(&frame(4, 0, 0, b"")).unwrap();
    s.write_all(&frame(1, 0x5, 1, &block)).unwrap();
    let mut data = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        // Frames: 3 bytes length, type, flags, 4 bytes stream, payload.
        let mut at = 0;
        while let Some(head) = data.get(at..at + 9) {
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, stream) = (head[3], u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff);
            let Some(payload) = data.get(at + 9..at + 9 + len) else { break };
            match (kind, stream) {
                // Envoy's replies start with an indexed `:status` (HPACK static table entries 8-14).
                (1, 1) => {
                    let statuses = [200, 204, 206, 304, 400, 404, 500];
                    return payload.first().and_then(|b| statuses.get(usize::from(b & 0x7f).wrapping_sub(8))).copied();
                }
                (3, 1) | (7, _) => return None,
                _ => at += 9 + len,
            }
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => data.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn envoy_refuses_over_http2_what_could_be_read_two_ways() {
    let g = Gateway::start(keys());
    let plain = raw_h2(g.envoy.port(), b"/healthz", (b"accept", b"*/*"));
    assert_eq!(plain, Some(200), "the raw client works");
    g.upstream.clear();
    // A fragment (Go's server would read `#/../..` as part of the path), control bytes in :path, an
    // upper-case header name (a second spelling of x-org-id): Envoy answers 400 or resets.
    for (path, header) in [
        (&b"/healthz#/../v1/venues/v_8/treatments"[..], (&b"accept"[..], &b"*/*"[..])),
        (b"/healthz\t/../v1/venues/v_8/treatments", (b"accept", b"*/*")),
        (b"/healthz\x7f/../v1/venues/v_8/treatments", (b"accept", b"*/*")),
        (b"/healthz", (b"X-Org-Id", b"evil")),
        (b"/healthz", (b"x-org-id", b"ev\x01il")),
    ] {
        let status = raw_h2(g.envoy.port(), path, header);
        assert!(matches!(status, None | Some(400)), "{:?}: {status:?}", String::from_utf8_lossy(path));
        assert!(g.upstream.requests().is_empty(), "{:?}: {:#?}", String::from_utf8_lossy(path), g.upstream.requests());
    }
}
