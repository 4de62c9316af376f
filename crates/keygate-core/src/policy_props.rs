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
    /// ASP.NET Core: method ignoring case, path decoded and resolved, segments ignoring case (Unicode).
    AspNet,
    /// Tomcat, Jetty, Spring: path parameters stripped from the raw path, then decoded and resolved.
    Tomcat,
    /// nginx decoding and resolving before it forwards, then an application that decodes again.
    NginxThenApp,
}

const READERS: [Reader; 6] =
    [Reader::Go, Reader::Wsgi, Reader::Express, Reader::AspNet, Reader::Tomcat, Reader::NginxThenApp];

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

/// The method and path segments `reader` routes `method path` by.
fn read(reader: Reader, method: &str, path: &str) -> (String, Vec<String>) {
    let path = path.split(['?', '#']).next().unwrap_or_default();
    let upper = method.to_ascii_uppercase();
    match reader {
        Reader::Go => (method.to_string(), resolve(&decode(path), false)),
        Reader::Wsgi => (upper, decode(path).split('/').filter(|s| !s.is_empty()).map(String::from).collect()),
        Reader::Express => (upper, fold(path.split('/').filter(|s| !s.is_empty()).map(String::from).collect())),
        Reader::AspNet => (upper, fold(resolve(&decode(path), true))),
        Reader::Tomcat => {
            let stripped: Vec<&str> = path.split('/').map(|seg| seg.split(';').next().unwrap_or_default()).collect();
            (method.to_string(), resolve(&decode(&stripped.join("/")), false))
        }
        Reader::NginxThenApp => {
            let once = resolve(&decode(path), false).join("/");
            (upper, resolve(&decode(&once), false))
        }
    }
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
    (prop::collection::vec(0u8..16, n), any::<bool>(), 0u8..5).prop_map(move |(tricks, trailing, prefix)| {
        let mut out = match prefix {
            0 => String::new(),
            1 => "/docs/..;".to_string(),
            2 => "/docs/x/..;/..;".to_string(),
            3 => "/docs/..".to_string(),
            _ => "/healthz/%2e%2e;".to_string(),
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
                _ => {
                    let mut first = true;
                    out.push('/');
                    for c in seg.chars() {
                        out.push(if std::mem::take(&mut first) { c.to_ascii_uppercase() } else { c });
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
                let (m, segments) = read(reader, method, &spelled);
                let Some(path) = plain(&segments) else { continue };
                prop_assert!(
                    allowed(&p, &m, &path, key),
                    "{method} {spelled} with {key:?} was allowed, but {reader:?} reads it as {m} {path}, which is refused"
                );
            }
        }
    }

    #[test]
    fn no_credential_or_identity_header_survives_in_any_spelling(
        noise in prop::collection::vec(noise_header(), 0..8),
        credential in presented(READER),
        path in prop::sample::select(vec!["/healthz", "/docs/x", "/v1/venues/v_7/treatments", "/v2/x"]),
    ) {
        let p = policy();
        let mut headers = request("GET", path, &noise);
        headers.extend(credential);
        let Decision::Allow { edits, .. } = p.decide(&p.keys, &RequestView::from_headers(&headers), &|| Some(0)) else {
            return Ok(());
        };
        let forwarded = apply(&edits, &headers);
        for name in ["authorization", "x-api-key"] {
            for (n, v) in &forwarded {
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
