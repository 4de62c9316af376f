//! Property tests of the decision: it never panics, header position does not matter, stripping is
//! idempotent, no spelling of a path gets by with less than its normal form needs, and no reading a
//! real upstream takes of an allowed request (its method, path and header names) needs more than
//! keygate checked, nor finds a credential or a forged identity.
//!
//! The upstream readers below are written from those servers' documented behaviour, independently of
//! keygate's own readings in `routes.rs`, so that they check it rather than repeat it.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::*;
use crate::keys::hash_key;
use proptest::prelude::*;
use serde_json::json;

const READER: &str = "sk_live_aaaa0001_reader";
const PLATFORM: &str = "sk_live_aaaa0002_platform";

fn policy() -> Policy {
    let hash = |k: &str| hex::encode(hash_key(k.as_bytes()));
    let config = json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "aaaa0001", "hash": hash(READER), "org": "org_42", "scopes": ["venues:read", "treatments:read"],
             "attributes": {"venue": "v_7"}},
            {"id": "aaaa0002", "hash": hash(PLATFORM), "org": "org_42", "scopes": ["venues:read"]}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"path": "/docs/**", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/bookings", "scopes": ["bookings:read"],
             "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"], "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    });
    crate::plugin::Plugin::from_json(config.to_string().as_bytes()).unwrap().policy
}

fn decide_on(p: &Policy, headers: &[(String, Vec<u8>)]) -> Option<DenyKind> {
    match p.decide(&p.keys, &RequestView::from_headers(headers), &|| Some(0)) {
        Decision::Allow { .. } => None,
        Decision::Deny(d) => Some(d.kind),
    }
}

fn request(method: &str, path: &str, extra: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut h =
        vec![(":method".to_string(), method.as_bytes().to_vec()), (":path".to_string(), path.as_bytes().to_vec())];
    h.extend_from_slice(extra);
    h
}

/// Applies an allowed request's edits to its header list, as Envoy would.
fn apply(edits: &HeaderEdits<'_>, headers: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = headers
        .iter()
        .filter(|(n, _)| {
            !edits.remove.iter().any(|r| n.eq_ignore_ascii_case(r))
                && !edits.set.iter().any(|(s, _)| n.eq_ignore_ascii_case(s))
        })
        .cloned()
        .collect();
    out.extend(edits.set.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())));
    out
}

fn noise_header() -> impl Strategy<Value = (String, Vec<u8>)> {
    let names = prop::sample::select(vec![
        "accept",
        "user-agent",
        "x-org-id",
        "X-Org-Id",
        "x-api-key-id",
        "x-api-key-scopes",
        "x-venue-id",
        "x_org_id",
        "X_Api_Key_Id",
        "x-api_key-scopes",
        "x_venue_id",
        "x.org.id",
        "x~api~key~id",
        "cookie",
        "x-forwarded-for",
        "x-request-id",
    ]);
    (names, prop::collection::vec(any::<u8>(), 0..24)).prop_map(|(n, v)| (n.to_ascii_lowercase(), v))
}

/// Ways to spell a path that an upstream may read as the same resource.
fn spelling(path: &'static str) -> impl Strategy<Value = String> {
    let segments: Vec<&'static str> = path.trim_start_matches('/').split('/').collect();
    let n = segments.len();
    (prop::collection::vec(0u8..8, n), any::<bool>()).prop_map(move |(tricks, trailing)| {
        let mut out = String::new();
        for (seg, trick) in segments.iter().zip(tricks) {
            match trick {
                0 => out.push_str(&format!("/{seg}")),
                1 => out.push_str(&format!("//{seg}")),
                2 => out.push_str(&format!("/./{seg}")),
                3 => out.push_str(&format!("/zz/../{seg}")),
                4 => out.push_str(&format!("/zz/%2e%2E/{seg}")),
                5 => out.push_str(&format!("%2F{seg}")),
                6 => out.push_str(&format!("\\{seg}")),
                _ => {
                    out.push('/');
                    for c in seg.chars() {
                        out.push_str(&format!("%{:02X}", c as u32));
                    }
                }
            }
        }
        if trailing {
            out.push('/');
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn decide_never_panics_on_any_request(
        method in prop::collection::vec(any::<u8>(), 0..8),
        path in prop::collection::vec(any::<u8>(), 0..64),
        headers in prop::collection::vec((prop::sample::select(vec!["authorization", "x-api-key", "x-org-id", "cookie"]),
                                          prop::collection::vec(any::<u8>(), 0..300)), 0..6),
    ) {
        let p = policy();
        let mut h = vec![(":method".to_string(), method), (":path".to_string(), path)];
        h.extend(headers.into_iter().map(|(n, v)| (n.to_string(), v)));
        let _ = decide_on(&p, &h);
    }

    #[test]
    fn accepted_key_is_accepted_in_every_header_and_position(
        noise in prop::collection::vec(noise_header(), 0..6),
        at in 0usize..7,
        spaces in 1usize..4,
        bearer_case in prop::sample::select(vec!["Bearer", "bearer", "BEARER"]),
    ) {
        let p = policy();
        let as_bearer = ("authorization".to_string(), format!("{bearer_case}{}{READER}", " ".repeat(spaces)).into_bytes());
        let as_bare = ("x-api-key".to_string(), format!(" {READER} ").into_bytes());
        for credential in [as_bearer, as_bare] {
            let mut extra = noise.clone();
            extra.insert(at.min(extra.len()), credential);
            prop_assert_eq!(decide_on(&p, &request("GET", "/v1/venues/v_7/treatments", &extra)), None);
        }
    }

    #[test]
    fn stripping_identity_headers_is_idempotent(
        noise in prop::collection::vec(noise_header(), 0..8),
        path in prop::sample::select(vec!["/healthz", "/v1/venues/v_7/treatments", "/v2/x"]),
    ) {
        let p = policy();
        let mut extra = noise;
        extra.push(("authorization".to_string(), format!("Bearer {READER}").into_bytes()));
        let first = request("GET", path, &extra);
        let Decision::Allow { edits, .. } = p.decide(&p.keys, &RequestView::from_headers(&first), &|| Some(0)) else {
            return Err(TestCaseError::fail("expected allow"));
        };
        let once = apply(&edits, &first);
        for name in &p.upstream.identity_headers {
            let set = edits.set.iter().filter(|(n, _)| n == name).count();
            prop_assert_eq!(once.iter().filter(|(n, _)| n == name).count(), set, "{} appears once if set, else never", name);
        }
        prop_assert!(!once.iter().any(|(n, _)| n == "authorization"));
        // The stripped request, sent again with its key, comes out exactly the same.
        let mut again = once.clone();
        again.push(("authorization".to_string(), format!("Bearer {READER}").into_bytes()));
        let Decision::Allow { edits: second, .. } = p.decide(&p.keys, &RequestView::from_headers(&again), &|| Some(0)) else {
            return Err(TestCaseError::fail("expected allow"));
        };
        prop_assert_eq!(apply(&second, &again), once.clone());
    }

    #[test]
    fn no_spelling_of_a_path_needs_fewer_scopes_than_its_normal_form(
        spelled in spelling("/v1/venues/v_7/treatments"),
    ) {
        let p = policy();
        // PLATFORM lacks treatments:read; READER is bound to venue v_7.
        let lacking = [("x-api-key".to_string(), PLATFORM.as_bytes().to_vec())];
        prop_assert_eq!(decide_on(&p, &request("GET", &spelled, &lacking)), Some(DenyKind::InsufficientScope), "{}", spelled);
    }

    #[test]
    fn no_spelling_of_a_path_weakens_the_tenant_binding(
        spelled in spelling("/v1/venues/v_8/treatments"),
    ) {
        let p = policy();
        let bound = [("x-api-key".to_string(), READER.as_bytes().to_vec())];
        prop_assert_eq!(decide_on(&p, &request("GET", &spelled, &bound)), Some(DenyKind::Forbidden), "{}", spelled);
    }
}

/// How a server behind Envoy reads a request's method and path.
#[derive(Debug, Clone, Copy)]
enum Reader {
    /// Envoy's own route matching, Go's `net/http` router: method as sent, path decoded, dots resolved.
    Go,
    /// Werkzeug (Flask), Django: method upper-cased, path decoded (PATH_INFO), empty segments merged.
    Wsgi,
    /// Express: method upper-cased, the path as sent, literal segments matched ignoring case.
    Express,
    /// ASP.NET Core (Kestrel): method ignoring case; the path decoded but for `%2F`, then RFC 3986's
    /// dot removal (empty segments kept); segments matched ignoring case.
    AspNet,
    /// Tomcat, Jetty, Spring: path parameters stripped from the raw path, then decoded and resolved.
    Tomcat,
    /// nginx decoding and resolving before it forwards, then an application that decodes again.
    NginxThenApp,
    /// Envoy's `normalize_path` in a proxy in front of the application (an Istio sidecar):
    /// unreserved escapes decoded, `\` as `/`, RFC 3986's dot removal; the application decodes.
    EnvoyThenApp,
    /// Node's `new URL(req.url, base)`: a leading `//` starts a host; `\` is `/`, `%2e` a dot, RFC
    /// 3986's dot removal; the router decodes the path name.
    Whatwg,
    /// Go 1.22's ServeMux: each segment of the path as sent decoded; a path that is not clean once
    /// decoded gets a redirect, not the handler.
    GoMux,
    /// IIS (HTTP.sys): `%uXXXX` and `%XX` decoded, `\` as `/`, dots resolved.
    Iis,
}

const READERS: [Reader; 10] = [
    Reader::Go,
    Reader::Wsgi,
    Reader::Express,
    Reader::AspNet,
    Reader::Tomcat,
    Reader::NginxThenApp,
    Reader::EnvoyThenApp,
    Reader::Whatwg,
    Reader::GoMux,
    Reader::Iis,
];

/// RFC 3986 section 5.2.4, as written there.
fn remove_dot_segments(path: &str) -> String {
    let mut input = path.to_string();
    let mut output = String::new();
    let pop = |output: &mut String| output.truncate(output.rfind('/').unwrap_or(0));
    while !input.is_empty() {
        if input.starts_with("../") {
            input.drain(..3);
        } else if input.starts_with("./") {
            input.drain(..2);
        } else if input.starts_with("/./") {
            input.replace_range(..3, "/");
        } else if input == "/." {
            input = "/".into();
        } else if input.starts_with("/../") {
            input.replace_range(..4, "/");
            pop(&mut output);
        } else if input == "/.." {
            input = "/".into();
            pop(&mut output);
        } else if input == "." || input == ".." {
            input.clear();
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push_str(&input[..end]);
            input.drain(..end);
        }
    }
    output
}

/// The segments of an absolute path, one trailing slash ignored.
fn segments_of(path: &str) -> Vec<String> {
    let path = path.strip_prefix('/').unwrap_or(path);
    let path = path.strip_suffix('/').unwrap_or(path);
    if path.is_empty() {
        return Vec::new();
    }
    path.split('/').map(String::from).collect()
}

/// Decodes the escapes `keep` does not refuse.
fn decode_but(s: &str, keep: impl Fn(u8) -> bool) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                let byte = (h * 16 + l) as u8;
                if !keep(byte) {
                    out.push(byte);
                    i += 3;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Decodes `%uXXXX` escapes only.
fn decode_percent_u(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(at) = rest.find("%u").or_else(|| rest.find("%U")) {
        out.push_str(&rest[..at]);
        let digits = rest.get(at + 2..at + 6).and_then(|d| u32::from_str_radix(d, 16).ok()).and_then(char::from_u32);
        match digits {
            Some(c) => {
                out.push(c);
                rest = &rest[at + 6..];
            }
            None => {
                out.push_str(&rest[at..at + 2]);
                rest = &rest[at + 2..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn resolve(path: &str, backslash: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for seg in path.split(|c| c == '/' || (backslash && c == '\\')) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s.to_string()),
        }
    }
    out
}

fn fold(segments: Vec<String>) -> Vec<String> {
    segments
        .into_iter()
        .map(|s| s.chars().flat_map(char::to_uppercase).flat_map(char::to_lowercase).collect())
        .collect()
}

/// The method and path segments `reader` routes `method path` by; `None` if it serves no handler.
fn read(reader: Reader, method: &str, path: &str) -> Option<(String, Vec<String>)> {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let upper = method.to_ascii_uppercase();
    Some(match reader {
        Reader::Go => (method.to_string(), resolve(&decode(path), false)),
        Reader::Wsgi => (upper, decode(path).split('/').filter(|s| !s.is_empty()).map(String::from).collect()),
        Reader::Express => (upper, fold(path.split('/').filter(|s| !s.is_empty()).map(String::from).collect())),
        Reader::AspNet => (upper, fold(segments_of(&remove_dot_segments(&decode_but(path, |c| c == b'/'))))),
        Reader::Tomcat => {
            let stripped: Vec<&str> = path.split('/').map(|seg| seg.split(';').next().unwrap_or_default()).collect();
            (method.to_string(), resolve(&decode(&stripped.join("/")), false))
        }
        Reader::NginxThenApp => {
            let once = resolve(&decode(path), false).join("/");
            (upper, resolve(&decode(&once), false))
        }
        Reader::EnvoyThenApp => {
            let unreserved = |c: u8| !(c.is_ascii_alphanumeric() || b"-._~".contains(&c));
            let normal = remove_dot_segments(&decode_but(&path.replace('\\', "/"), unreserved));
            (method.to_string(), segments_of(&decode(&normal)))
        }
        Reader::Whatwg => {
            let slashed = path.replace('\\', "/");
            let path = match slashed.strip_prefix("//") {
                Some(rest) => {
                    let rest = rest.trim_start_matches('/');
                    rest.find('/').map_or("/", |at| &rest[at..]).to_string()
                }
                None => slashed,
            };
            let dotted: Vec<String> = path
                .split('/')
                .map(|seg| match seg.to_ascii_lowercase().as_str() {
                    "%2e" => ".".to_string(),
                    ".%2e" | "%2e." | "%2e%2e" => "..".to_string(),
                    _ => seg.to_string(),
                })
                .collect();
            (upper, segments_of(&decode_but(&remove_dot_segments(&dotted.join("/")), |c| c == b'/')))
        }
        Reader::GoMux => {
            let decoded = decode(path);
            if resolve(&decoded, false).join("/") != decoded.trim_start_matches('/').trim_end_matches('/') {
                return None; // a redirect to the clean path, which keygate then sees
            }
            (method.to_string(), segments_of(path).iter().map(|s| decode(s)).collect())
        }
        Reader::Iis => (upper, fold(resolve(&decode(&decode_percent_u(path)), true))),
    })
}

/// A reading written out as a plain request, if it can be: no segment keygate would read again.
fn plain(segments: &[String]) -> Option<String> {
    let clean = |s: &String| !s.is_empty() && s != "." && s != ".." && !s.contains(['%', ';', '\\', '?', '#', '/']);
    segments.iter().all(clean).then(|| format!("/{}", segments.join("/")))
}

/// Ways to spell a path that some upstream may read as the same resource, beyond `spelling`: path
/// parameters, a public prefix walked back with `..;`, the case of letters, a second encoding.
fn reading_spelling(path: &'static str) -> impl Strategy<Value = String> {
    let segments: Vec<&'static str> = path.trim_start_matches('/').split('/').collect();
    let n = segments.len();
    (prop::collection::vec(0u8..21, n), any::<bool>(), 0u8..7, 0u8..4).prop_map(
        move |(tricks, trailing, prefix, suffix)| {
            let mut out = match prefix {
                0 => String::new(),
                1 => "/docs/..;".to_string(),
                2 => "/docs/x/..;/..;".to_string(),
                3 => "/docs/..".to_string(),
                4 => "/healthz/%2e%2e;".to_string(),
                // A host to a WHATWG URL parser.
                5 => "//docs".to_string(),
                _ => "/docs/%u002e%u002e".to_string(),
            };
            for (seg, trick) in segments.iter().zip(tricks) {
                match trick {
                    0 => out.push_str(&format!("/{seg}")),
                    1 => out.push_str(&format!("/{seg};x=1")),
                    2 => out.push_str(&format!("/zz/..;/{seg}")),
                    3 => out.push_str(&format!("/.;/{seg}")),
                    4 => out.push_str(&format!("/{seg}%3Bx")),
                    5 => out.push_str(&format!("/{}", seg.to_uppercase())),
                    6 => out.push_str(&format!("/{}", seg.replace('s', "\u{17f}"))),
                    7 => out.push_str(&format!("/zz/%252e%252e/{seg}")),
                    8 => out.push_str(&format!("/zz%252F..%252F{seg}")),
                    9 => out.push_str(&format!("/zz/%2e%2e/{seg}")),
                    10 => out.push_str(&format!("//{seg}")),
                    11 => out.push_str(&format!("\\{seg}")),
                    12 => out.push_str(&format!("/{}", seg.replace('e', "%65"))),
                    // `\` is a separator to some readers only: these walk back into /docs/** for them.
                    13 => out.push_str(&format!("/{seg}/q\\..\\..\\..\\..\\..\\..\\docs\\a\\b/..")),
                    14 => out.push_str(&format!("/{seg}/q%5C..%5C..%5C..%5C..%5C..%5C..%5Cdocs%5Ca%5Cb/..")),
                    // `//..` removes only the empty segment to RFC 3986's dot removal, a real one otherwise.
                    15 => out.push_str(&format!("/zz//../{seg}")),
                    16 => out.push_str(&format!("/{seg}//..")),
                    // Decoded, `%2F..` walks back into /docs; kept encoded, the final `..` removes one segment.
                    17 => out.push_str(&format!("/{seg}/q%2F..%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fa/..")),
                    18 => out.push_str(&format!("/zz/%u002e%u002e/{seg}")),
                    19 => out.push_str(&format!("/zz/.%2E/{seg}")),
                    _ => {
                        let mut first = true;
                        out.push('/');
                        for c in seg.chars() {
                            out.push(if std::mem::take(&mut first) { c.to_ascii_uppercase() } else { c });
                        }
                    }
                }
            }
            match suffix {
                // Nothing to readers that drop empty segments first; `/docs/a` to RFC 3986 readers.
                1 => out.push_str("//..//..//..//..//..//../docs/a"),
                2 => out.push_str("/q%2F..%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fa/.."),
                3 => out.push_str("/..%2f..%2f..%2f..%2f..%2f..%2fdocs"),
                _ => {}
            }
            if trailing {
                out.push('/');
            }
            out
        },
    )
}

fn method_spelling() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["GET", "get", "Get", "gEt", "HEAD", "head", "POST", "post"])
}

/// The credentials a caller may present: none, a key lacking a scope, a key bound to venue v_7.
fn caller() -> impl Strategy<Value = Option<&'static str>> {
    prop::sample::select(vec![None, Some(PLATFORM), Some(READER)])
}

fn allowed(p: &Policy, method: &str, path: &str, key: Option<&str>) -> bool {
    let extra: Vec<(String, Vec<u8>)> =
        key.map(|k| ("x-api-key".to_string(), k.as_bytes().to_vec())).into_iter().collect();
    decide_on(p, &request(method, path, &extra)).is_none()
}

/// A name as CGI, WSGI and Rack read it, and lighttpd (every character but letters and digits as `_`).
fn cgi(name: &str) -> String {
    let upper: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("HTTP_{upper}")
}

/// How a credential is presented: alone, beside another scheme (repeated or joined), or twice.
fn presented(key: &'static str) -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let h = |n: &str, v: String| (n.to_string(), v.into_bytes());
    prop::sample::select(vec![0u8, 1, 2, 3, 4, 5, 6, 7, 8, 9]).prop_map(move |form| match form {
        0 => vec![h("authorization", format!("Bearer {key}"))],
        1 => vec![h("authorization", "Basic eA==".into()), h("authorization", format!("Bearer {key}"))],
        2 => vec![h("authorization", format!("Basic eA==, Bearer {key}"))],
        3 => vec![h("authorization", format!("Bearer {key},Basic eA=="))],
        4 => vec![h("x-api-key", key.into())],
        5 => vec![h("x-api-key", format!("{key}, {key}"))],
        6 => vec![h("x_api_key", key.into()), h("authorization", format!("Bearer {key}"))],
        7 => vec![h("authorization", format!("Token {key}"))],
        8 => vec![h("x.api.key", key.into()), h("x-api-key", key.into())],
        _ => vec![h("x-api-key", key.into()), h("X_API_KEY", key.into())],
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3_000, ..ProptestConfig::default() })]

    #[test]
    fn no_upstream_reading_of_an_allowed_request_needs_more_than_keygate_checked(
        method in method_spelling(),
        (target, spelled) in prop::sample::select(vec![
            "/v1/venues/v_7/treatments", "/v1/venues/v_8/treatments", "/v1/venues/v_8/bookings", "/v1/venues/v_8/x",
        ]).prop_flat_map(|t| (Just(t), reading_spelling(t))),
        key in caller(),
    ) {
        let p = policy();
        let _ = target;
        if allowed(&p, method, &spelled, key) {
            for reader in READERS {
                let Some((m, segments)) = read(reader, method, &spelled) else { continue };
                let Some(path) = plain(&segments) else { continue };
                prop_assert!(
                    allowed(&p, &m, &path, key),
                    "{method} {spelled} with {key:?} was allowed, but {reader:?} reads it as {m} {path}, which is refused"
                );
            }
        }
    }

    /// An allowed request reaches the upstream with no key and no identity but keygate's; a refused
    /// one, which goes nowhere, keeps no identity either, for Envoy's access log to read.
    #[test]
    fn no_credential_or_identity_header_survives_in_any_spelling(
        noise in prop::collection::vec(noise_header(), 0..8),
        credential in presented(READER),
        path in prop::sample::select(vec!["/healthz", "/docs/x", "/v1/venues/v_7/treatments", "/v2/x"]),
    ) {
        let p = policy();
        let mut headers = request("GET", path, &noise);
        headers.extend(credential);
        let (edits, allowed) = match p.decide(&p.keys, &RequestView::from_headers(&headers), &|| Some(0)) {
            Decision::Allow { edits, .. } => (edits, true),
            // Nothing goes upstream, but Envoy's access log reads what is left of the request.
            Decision::Deny(denial) => (HeaderEdits { remove: denial.remove, set: Vec::new() }, false),
        };
        let forwarded = apply(&edits, &headers);
        for name in ["authorization", "x-api-key"] {
            for (n, v) in forwarded.iter().filter(|_| allowed) {
                if cgi(n) == cgi(name) {
                    prop_assert!(!String::from_utf8_lossy(v).contains(READER), "{n}: the key reaches the upstream");
                }
            }
        }
        for identity in &p.upstream.identity_headers {
            let seen: Vec<&(String, Vec<u8>)> = forwarded.iter().filter(|(n, _)| cgi(n) == cgi(identity)).collect();
            match edits.set.iter().find(|(n, _)| n == identity) {
                Some((_, value)) => {
                    let expected = (identity.to_string(), value.as_bytes().to_vec());
                    prop_assert_eq!(seen, vec![&expected]);
                }
                None => prop_assert!(seen.is_empty(), "{} forged as {:?}", identity, seen),
            }
        }
    }
}

proptest! {
    // A thousand lists of names are plenty (about a second, unoptimised).
    #![proptest_config(ProptestConfig { cases: 1_000, ..ProptestConfig::default() })]

    #[test]
    fn no_trailer_keygate_reads_or_sets_survives_and_every_other_one_does(
        trailers in prop::collection::vec(prop_oneof![
            noise_header(),
            (prop::sample::select(vec![
                "authorization", "Authorization", "x-api-key", "x_api_key", "X.API.KEY", "x-http-method-override",
                "x_http_method", "x-original-url", "X_Rewrite_Url", "x-method-override", "grpc-status", "x-api-key-",
            ]), prop::collection::vec(any::<u8>(), 0..24)).prop_map(|(n, v)| (n.to_string(), v)),
        ], 0..10),
    ) {
        let p = policy();
        let remove = p.trailers_to_remove(&trailers);
        let mut managed: Vec<&str> = vec!["authorization", "x-api-key"];
        managed.extend(p.upstream.identity_headers.iter().map(String::as_str));
        managed.extend(["x-original-url", "x-rewrite-url", "x-http-method-override", "x-http-method", "x-method-override"]);
        let kept: Vec<&(String, Vec<u8>)> =
            trailers.iter().filter(|(n, _)| !remove.iter().any(|r| r.eq_ignore_ascii_case(n))).collect();
        for (name, _) in &trailers {
            let theirs = managed.iter().any(|m| cgi(m) == cgi(name));
            prop_assert_eq!(kept.iter().any(|(n, _)| n == name), !theirs, "{}", name);
        }
        for (i, name) in remove.iter().enumerate() {
            prop_assert!(!remove[..i].iter().any(|r| r.eq_ignore_ascii_case(name)), "{} named twice", name);
        }
    }
}
