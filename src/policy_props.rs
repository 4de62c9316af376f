//! Property tests of the decision: it never panics, header position does not matter, stripping is
//! idempotent, and no spelling of a path gets by with less than its normal form needs.
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
            {"path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"], "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    });
    Policy::from_json(config.to_string().as_bytes()).unwrap()
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
