//! Unit tests of the one decision, on the host.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::*;
use crate::keys::{hash_key, KeySource, Lookup};
use serde_json::json;

const READER: &str = "sk_live_aaaa0001_reader";
const PLATFORM: &str = "sk_live_aaaa0002_platform";
const REVOKED: &str = "sk_live_aaaa0003_revoked";
const EXPIRING: &str = "sk_live_aaaa0004_expiring";
const WILDCARD: &str = "sk_live_aaaa0005_wildcard";
const WRITER: &str = "sk_live_aaaa0006_writer";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

fn config() -> serde_json::Value {
    json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"], "max_length": 64},
        "keys": [
            {"id": "aaaa0001", "hash": hash(READER), "org": "org_42", "scopes": ["venues:read", "treatments:read"],
             "attributes": {"venue": "v_7"}},
            {"id": "aaaa0002", "hash": hash(PLATFORM), "org": "org_42", "scopes": ["venues:read"]},
            {"id": "aaaa0003", "hash": hash(REVOKED).to_uppercase(), "org": "org_42", "scopes": ["venues:read"], "revoked": true},
            {"id": "aaaa0004", "hash": hash(EXPIRING), "org": "org_42", "scopes": ["venues:read"], "expires_at": 1000},
            {"id": "aaaa0005", "hash": hash(WILDCARD), "org": "org_43", "scopes": ["read:*"]},
            {"id": "aaaa0006", "hash": hash(WRITER), "org": "org_44", "scopes": ["read_write"]}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues", "scopes": ["venues:read"]},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
             "bind": {"venue_id": "venue"}},
            {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}},
            {"path": "/v1/orgs/{org_id}/**", "bind": {"org_id": "org"}},
            {"methods": ["POST"], "path": "/v1/bookings", "scopes": ["read", "write:bookings"]},
            {"path": "/v1/reports/**", "scopes": ["read:reports"]}
        ],
        "scope_implies": {"read_write": ["read", "write:*"]},
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    })
}

fn policy_from(config: serde_json::Value) -> Policy {
    crate::plugin::Plugin::from_json(config.to_string().as_bytes()).unwrap().policy
}

fn headers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
}

fn decide_at<'p>(
    policy: &'p Policy,
    method: &str,
    path: &str,
    extra: &[(&str, &str)],
    now: Option<i64>,
) -> Decision<'p> {
    let mut pairs = vec![(":method", method), (":path", path)];
    pairs.extend_from_slice(extra);
    let h = headers(&pairs);
    let view = RequestView::from_headers(&h);
    policy.decide(&policy.keys, &view, &|| now)
}

fn decide<'p>(policy: &'p Policy, method: &str, path: &str, extra: &[(&str, &str)]) -> Decision<'p> {
    decide_at(policy, method, path, extra, Some(500))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

fn kind(d: &Decision<'_>) -> Option<DenyKind> {
    match d {
        Decision::Deny(denial) => Some(denial.kind),
        Decision::Allow { .. } => None,
    }
}

#[test]
fn no_key_is_missing_key() {
    let p = policy_from(config());
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &[])), Some(DenyKind::MissingKey));
    let basic = [("authorization", "Basic dXNlcjpwYXNz")];
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &basic)), Some(DenyKind::MissingKey));
}

#[test]
fn key_in_query_string_is_not_read() {
    let p = policy_from(config());
    let path = format!("/v1/venues?api_key={READER}&access_token={READER}");
    let cookie = format!("api_key={READER}");
    let d = decide(&p, "GET", &path, &[("cookie", &cookie)]);
    assert_eq!(kind(&d), Some(DenyKind::MissingKey));
}

#[test]
fn valid_key_is_allowed_with_identity_headers() {
    let p = policy_from(config());
    let auth = bearer(READER);
    let d = decide(&p, "GET", "/v1/venues/v_7/treatments", &[("authorization", &auth)]);
    let Decision::Allow { edits, key_id } = d else { panic!("expected allow, got {d:?}") };
    assert_eq!(key_id.as_deref(), Some("aaaa0001"));
    assert_eq!(edits.remove, vec!["authorization"]);
    assert_eq!(
        edits.set,
        vec![
            ("x-org-id", "org_42".to_string()),
            ("x-api-key-id", "aaaa0001".to_string()),
            ("x-api-key-scopes", "venues:read treatments:read".to_string()),
            ("x-venue-id", "v_7".to_string()),
        ]
    );
}

#[test]
fn second_header_is_accepted_and_stripped() {
    let p = policy_from(config());
    let d = decide(&p, "GET", "/v1/venues", &[("x-api-key", PLATFORM)]);
    let Decision::Allow { edits, .. } = d else { panic!("expected allow, got {d:?}") };
    assert_eq!(edits.remove, vec!["x-api-key"]);
}

#[test]
fn authorization_takes_precedence_over_x_api_key() {
    let p = policy_from(config());
    let auth = bearer(READER);
    let d = decide(&p, "GET", "/v1/venues", &[("x-api-key", "sk_live_nope"), ("authorization", &auth)]);
    let Decision::Allow { edits, key_id } = d else { panic!("expected allow, got {d:?}") };
    assert_eq!(key_id.as_deref(), Some("aaaa0001"));
    assert_eq!(edits.remove, vec!["authorization", "x-api-key"], "every credential is kept from the upstream");
}

#[test]
fn malformed_and_unknown_keys_are_invalid() {
    let p = policy_from(config());
    let long = format!("sk_live_{}", "a".repeat(100));
    let two = format!("Bearer {READER}, Bearer {PLATFORM}");
    for auth in [
        "Bearer sk_test_aaaa0001_reader".to_string(),
        "Bearer SK_LIVE_aaaa0001_reader".to_string(),
        format!("Bearer {long}"),
        "Bearer sk_live_aaaa0001_wrongsecret".to_string(),
        format!("Bearer {READER} junk"),
        format!("Bearer\t{READER}"),
        two,
    ] {
        let d = decide(&p, "GET", "/v1/venues", &[("authorization", &auth)]);
        assert_eq!(kind(&d), Some(DenyKind::InvalidKey), "{auth:?}");
    }
    let auth = bearer(READER);
    let twice = [("authorization", auth.as_str()), ("authorization", auth.as_str())];
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &twice)), Some(DenyKind::InvalidKey));
}

#[test]
fn revoked_key_is_refused_as_revoked() {
    let p = policy_from(config());
    let auth = bearer(REVOKED);
    let d = decide(&p, "GET", "/v1/venues", &[("authorization", &auth)]);
    let Decision::Deny(denial) = d else { panic!("expected deny") };
    assert_eq!(denial.kind, DenyKind::RevokedKey);
    assert_eq!(denial.key_id.as_deref(), Some("aaaa0003"));
}

#[test]
fn key_stops_working_at_its_expiry_instant() {
    let p = policy_from(config());
    let auth = bearer(EXPIRING);
    let h = [("authorization", auth.as_str())];
    assert_eq!(kind(&decide_at(&p, "GET", "/v1/venues", &h, Some(999_999))), None);
    assert_eq!(kind(&decide_at(&p, "GET", "/v1/venues", &h, Some(1_000_000))), Some(DenyKind::ExpiredKey));
    assert_eq!(
        kind(&decide_at(&p, "GET", "/v1/venues", &h, None)),
        Some(DenyKind::ExpiredKey),
        "no clock: fail closed"
    );
}

#[test]
fn key_lacking_a_scope_gets_insufficient_scope_with_the_missing_list() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM);
    let d = decide(&p, "GET", "/v1/venues/v_7/treatments", &[("authorization", &auth)]);
    let Decision::Deny(denial) = d else { panic!("expected deny") };
    assert_eq!(denial.kind, DenyKind::InsufficientScope);
    assert_eq!(denial.missing_scopes, vec!["treatments:read"]);
    assert_eq!(denial.key_id.as_deref(), Some("aaaa0002"));
}

#[test]
fn wildcard_and_implied_scopes_grant() {
    let p = policy_from(config());
    let auth = bearer(WILDCARD);
    assert_eq!(kind(&decide(&p, "GET", "/v1/reports/2026", &[("authorization", &auth)])), None);
    let auth = bearer(WRITER);
    assert_eq!(kind(&decide(&p, "POST", "/v1/bookings", &[("authorization", &auth)])), None);
    let auth = bearer(WILDCARD);
    let d = decide(&p, "POST", "/v1/bookings", &[("authorization", &auth)]);
    let Decision::Deny(denial) = d else { panic!("expected deny") };
    assert_eq!(denial.missing_scopes, vec!["read", "write:bookings"]);
}

#[test]
fn venue_restricted_key_cannot_read_other_venue() {
    let p = policy_from(config());
    let auth = bearer(READER);
    let h = [("authorization", auth.as_str())];
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_7/treatments", &h)), None);
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_8/treatments", &h)), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_8/customers", &h)), Some(DenyKind::Forbidden));
}

#[test]
fn platform_wide_key_reaches_every_venue() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM);
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_8/customers", &[("authorization", &auth)])), None);
}

#[test]
fn org_binding_is_always_enforced() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM);
    let h = [("authorization", auth.as_str())];
    assert_eq!(kind(&decide(&p, "GET", "/v1/orgs/org_42/teams", &h)), None);
    assert_eq!(kind(&decide(&p, "GET", "/v1/orgs/org_43/teams", &h)), Some(DenyKind::Forbidden));
}

#[test]
fn path_tricks_never_weaken_the_tenant_binding() {
    let p = policy_from(config());
    let auth = bearer(READER);
    let h = [("authorization", auth.as_str())];
    for path in [
        "/v1/venues/v_7/../v_8/treatments",
        "/v1/venues/v_7/%2e%2e/v_8/treatments",
        "/v1/venues/v_7/%2E%2E%2Fv_8/treatments",
        "/v1/venues/v_7%2F..%2Fv_8/treatments",
        "/v1/venues/v_7\\..\\v_8/treatments",
        "/v1//venues/v_8/treatments",
        "//v1/venues/v_8/treatments",
        "/v1/venues/v_8/treatments/",
        "/v1/venues/v_8/./treatments",
        "/v1/%76enues/v_8/treatments",
        "/v1/venues/v_8/treatments?venue=v_7",
        "/v1/venues/v_8/x/../../../healthz",
    ] {
        assert_eq!(kind(&decide(&p, "GET", path, &h)), Some(DenyKind::Forbidden), "{path}");
    }
}

#[test]
fn path_tricks_never_reach_a_scoped_route_with_fewer_scopes() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM); // venues:read only
    let h = [("authorization", auth.as_str())];
    for path in [
        "/v1/venues/v_7/treatments/",
        "/v1/venues/v_7//treatments",
        "/v1/venues/v_7/x/../treatments",
        "/v1/venues/v_7%2Ftreatments",
        "/healthz/../v1/venues/v_7/treatments",
    ] {
        assert_eq!(kind(&decide(&p, "GET", path, &h)), Some(DenyKind::InsufficientScope), "{path}");
    }
}

#[test]
fn harmless_dot_segment_is_allowed() {
    let p = policy_from(config());
    let auth = bearer(READER);
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_7/./treatments", &[("authorization", &auth)])), None);
}

#[test]
fn get_route_also_governs_head() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM);
    let d = decide(&p, "HEAD", "/v1/venues/v_7/treatments", &[("authorization", &auth)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope));
}

#[test]
fn public_route_needs_no_key_and_removes_spoofed_identity() {
    let p = policy_from(config());
    let d = decide(
        &p,
        "GET",
        "/healthz",
        &[("x-org-id", "org_evil"), ("x-api-key-scopes", "*"), ("x-api-key-scopes", "*"), ("x-venue-id", "v_1")],
    );
    let Decision::Allow { edits, key_id } = d else { panic!("expected allow") };
    assert_eq!(key_id, None);
    assert!(edits.set.is_empty());
    assert_eq!(edits.remove, vec!["x-org-id", "x-api-key-scopes", "x-venue-id"]);
}

#[test]
fn public_route_strips_a_presented_key() {
    let p = policy_from(config());
    let d = decide(&p, "GET", "/healthz", &[("x-api-key", "garbage")]);
    let Decision::Allow { edits, .. } = d else { panic!("expected allow") };
    assert_eq!(edits.remove, vec!["x-api-key"]);
}

#[test]
fn public_route_reached_through_a_trick_is_not_public() {
    let p = policy_from(config());
    assert_eq!(kind(&decide(&p, "GET", "/healthz/../v1/venues", &[])), Some(DenyKind::MissingKey));
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/../../healthz", &[])), Some(DenyKind::MissingKey));
}

#[test]
fn unmatched_routes_authenticate_by_default_and_deny_when_configured() {
    let auth = bearer(PLATFORM);
    let h = [("authorization", auth.as_str())];
    let p = policy_from(config());
    assert_eq!(kind(&decide(&p, "GET", "/v2/anything", &h)), None);
    assert_eq!(kind(&decide(&p, "GET", "/v2/anything", &[])), Some(DenyKind::MissingKey));
    let mut c = config();
    c["unmatched"] = json!("deny");
    let p = policy_from(c);
    assert_eq!(kind(&decide(&p, "GET", "/v2/anything", &h)), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "DELETE", "/v1/venues", &h)), Some(DenyKind::Forbidden));
}

#[test]
fn identity_header_set_to_null_is_neither_set_nor_trusted() {
    let mut c = config();
    c["upstream"] = json!({"scopes_header": null, "org_header": "x-tenant", "strip_credentials": false});
    let p = policy_from(c);
    let auth = bearer(PLATFORM);
    let d =
        decide(&p, "GET", "/v1/venues", &[("authorization", &auth), ("x-tenant", "evil"), ("x-api-key-scopes", "x")]);
    let Decision::Allow { edits, .. } = d else { panic!("expected allow") };
    assert_eq!(edits.set, vec![("x-tenant", "org_42".to_string()), ("x-api-key-id", "aaaa0002".to_string())]);
    assert!(edits.remove.is_empty(), "credential kept, x-api-key-scopes no longer keygate's: {:?}", edits.remove);
}

#[test]
fn attribute_header_is_removed_when_the_key_has_no_such_attribute() {
    let p = policy_from(config());
    let auth = bearer(PLATFORM);
    let d = decide(&p, "GET", "/v1/venues", &[("authorization", &auth), ("x-venue-id", "v_7")]);
    let Decision::Allow { edits, .. } = d else { panic!("expected allow") };
    assert!(edits.remove.iter().any(|r| r == "x-venue-id"));
    assert!(!edits.set.iter().any(|(n, _)| *n == "x-venue-id"));
}

#[test]
fn unavailable_key_source_refuses() {
    struct Nothing;
    impl KeySource for Nothing {
        fn lookup(&self, _: &crate::keys::KeyHash) -> Lookup<'_> {
            Lookup::Unavailable
        }
    }
    let p = policy_from(config());
    let h = headers(&[(":method", "GET"), (":path", "/v1/venues"), ("x-api-key", READER)]);
    let d = p.decide(&Nothing, &RequestView::from_headers(&h), &|| Some(0));
    assert_eq!(kind(&d), Some(DenyKind::KeySetUnavailable));
    let h = headers(&[(":method", "GET"), (":path", "/healthz")]);
    assert_eq!(kind(&p.decide(&Nothing, &RequestView::from_headers(&h), &|| Some(0))), None);
}

#[test]
fn empty_key_set_refuses_every_key() {
    let mut c = config();
    c["keys"] = json!([]);
    let p = policy_from(c);
    let auth = bearer(READER);
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &[("authorization", &auth)])), Some(DenyKind::InvalidKey));
}

/// The public `/docs/**` beside the protected routes, as in the outside review.
fn config_with_docs() -> serde_json::Value {
    let mut c = config();
    let routes = c["routes"].as_array_mut().unwrap();
    routes.insert(0, json!({"path": "/docs/**", "public": true}));
    c
}

#[test]
fn a_method_in_lower_or_mixed_case_is_governed_by_its_upper_case_rule() {
    let p = policy_from(config());
    let platform = [("x-api-key", PLATFORM)];
    for method in ["get", "GeT", "gET", "head", "Head"] {
        // PLATFORM lacks treatments:read, which the GET route needs; the any-method route would not ask.
        let d = decide(&p, method, "/v1/venues/v_7/treatments", &platform);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{method}");
        let d = decide(&p, method, "/v1/venues/v_8/treatments", &[("x-api-key", READER)]);
        assert_eq!(kind(&d), Some(DenyKind::Forbidden), "{method}: the binding holds");
    }
    assert_eq!(kind(&decide(&p, "get", "/v1/venues/v_7/treatments", &[("x-api-key", READER)])), None);
    // A POST-only route: `post` needs what POST needs.
    let d = decide(&p, "post", "/v1/bookings", &[("x-api-key", PLATFORM)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope));
}

#[test]
fn a_lower_case_method_under_unmatched_deny_is_refused() {
    let mut c = config();
    c["unmatched"] = json!("deny");
    let p = policy_from(c);
    // `get` is no route's method to a case-sensitive reader: that reading is unmatched.
    assert_eq!(kind(&decide(&p, "get", "/v1/venues", &[("x-api-key", READER)])), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &[("x-api-key", READER)])), None);
}

#[test]
fn path_parameters_do_not_escape_a_route_or_a_binding() {
    let p = policy_from(config_with_docs());
    // `..;` is `..` to Tomcat, Jetty and Spring: this is the treatments route, not /docs/**.
    for path in ["/docs/..;/v1/venues/v_8/treatments", "/docs/..;x=1/v1/venues/v_8/treatments"] {
        assert_eq!(kind(&decide(&p, "GET", path, &[])), Some(DenyKind::MissingKey), "{path}");
        assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden), "{path}");
    }
    for path in [
        "/v1/venues/v_7/..;/v_8/x",
        "/v1/venues;x=1/v_8/treatments",
        "/v1/venues/v_8;x=1/treatments",
        "/v1/venues/v_8/treatments;x=1",
        "/v1/venues/v_7/%2e%2e;/v_8/x",
        "/v1/venues/v_7%3B/..%3B/v_8/x",
    ] {
        assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden), "{path}");
    }
    let d = decide(&p, "GET", "/v1/venues/v_7/treatments;x=1", &[("x-api-key", PLATFORM)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "parameters do not shed the treatments scope");
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues/v_7/treatments;jsessionid=1", &[("x-api-key", READER)])), None);
}

#[test]
fn a_case_variant_of_a_path_needs_what_the_path_needs() {
    let p = policy_from(config_with_docs());
    for path in ["/V1/venues/v_8/treatments", "/v1/VENUES/v_8/Treatments", "/v1/venue%C5%BF/v_8/treatments"] {
        assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden), "{path}");
        let d = decide(&p, "GET", path, &[("x-api-key", PLATFORM)]);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{path}");
    }
    // Captures are compared as sent: `V_7` is not the key's venue `v_7`.
    let d = decide(&p, "GET", "/v1/venues/V_7/treatments", &[("x-api-key", READER)]);
    assert_eq!(kind(&d), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "GET", "/V1/Venues/v_7/Treatments", &[("x-api-key", READER)])), None);
    // A public route spelled in another case is not public to an exact reader: a key is needed.
    assert_eq!(kind(&decide(&p, "GET", "/HEALTHZ", &[])), Some(DenyKind::MissingKey));
}

#[test]
fn a_joined_authorization_with_a_bearer_key_is_invalid_and_stripped() {
    let p = policy_from(config_with_docs());
    let joined = format!("Basic eA==, Bearer {READER}");
    let d = decide(&p, "GET", "/v1/venues", &[("authorization", &joined)]);
    assert_eq!(kind(&d), Some(DenyKind::InvalidKey), "the deciding header");
    // On a public route, and where another header decides, it is still removed.
    let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("authorization", &joined)]) else {
        panic!("public")
    };
    assert_eq!(edits.remove, vec!["authorization"]);
    let c = {
        let mut c = config();
        c["credential"]["headers"] = json!(["x-api-key", "authorization"]);
        c
    };
    let p = policy_from(c);
    let Decision::Allow { edits, key_id } =
        decide(&p, "GET", "/v1/venues", &[("x-api-key", READER), ("authorization", &joined)])
    else {
        panic!("x-api-key decides")
    };
    assert_eq!(key_id.as_deref(), Some("aaaa0001"));
    assert_eq!(edits.remove, vec!["x-api-key", "authorization"]);
}

#[test]
fn underscore_spellings_of_identity_and_credential_headers_are_removed() {
    let p = policy_from(config_with_docs());
    let twins = [
        ("x_org_id", "evil"),
        ("x_api_key_id", "root"),
        ("x-api_key-scopes", "*"),
        ("x_venue_id", "v_1"),
        ("x_api_key", "sk_live_other"),
        ("x.org.id", "evil_dot"),
        ("x~venue~id", "evil_tilde"),
        ("x!api!key", "sk_live_bang"),
    ];
    let auth = bearer(READER);
    let mut with_key = twins.to_vec();
    with_key.push(("authorization", &auth));
    for (path, extra) in [("/docs/x", &twins[..]), ("/v1/venues", &with_key[..])] {
        let Decision::Allow { edits, .. } = decide(&p, "GET", path, extra) else { panic!("{path}") };
        for (name, _) in twins {
            assert!(edits.remove.iter().any(|r| r == name), "{path}: {name} kept; {:?}", edits.remove);
        }
    }
    // Only twins of what keygate manages: other underscore headers pass.
    let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("x_trace_id", "1")]) else { panic!() };
    assert!(edits.remove.is_empty());
    assert!(same_to_cgi("X_Org-ID", "x-org-id"));
    assert!(same_to_cgi("x.org~id", "x-org-id"));
    assert!(!same_to_cgi("x-org-idx", "x-org-id"));
}

#[test]
fn a_refusal_removes_every_spelling_of_a_spoofed_identity_and_nothing_else() {
    let p = policy_from(config());
    let spoofed = [
        ("x-api-key-id", "aaaa0002"),
        ("X-Api-Key-Id", "aaaa0002"),
        ("x-org-id", "org_evil"),
        ("x-api-key-scopes", "*"),
        ("x-venue-id", "v_1"),
        ("x_org_id", "org_evil"),
        ("x.api.key.id", "aaaa0002"),
        ("x_api_key", "sk_live_other"),
        ("x-trace-id", "t1"),
    ];
    let expected = ["x-org-id", "x-api-key-id", "x-api-key-scopes", "x-venue-id", "x_org_id", "x.api.key.id"];
    let (reader, revoked, platform, wrong) =
        (bearer(READER), bearer(REVOKED), bearer(PLATFORM), bearer("sk_live_aaaa0001_wrong"));
    let refused = [
        ("/v1/venues", None, DenyKind::MissingKey),
        ("/v1/venues", Some(wrong.as_str()), DenyKind::InvalidKey),
        ("/v1/venues", Some(revoked.as_str()), DenyKind::RevokedKey),
        ("/v1/venues/v_7/treatments", Some(platform.as_str()), DenyKind::InsufficientScope),
        ("/v1/venues/v_8/treatments", Some(reader.as_str()), DenyKind::Forbidden),
    ];
    for (path, auth, expected_kind) in refused {
        let mut extra = spoofed.to_vec();
        extra.extend(auth.map(|a| ("authorization", a)));
        let Decision::Deny(denial) = decide(&p, "GET", path, &extra) else { panic!("{path} {auth:?} allowed") };
        assert_eq!(denial.kind, expected_kind, "{path} {auth:?}");
        assert_eq!(denial.remove, expected, "{path} {auth:?}: credentials and other headers stay");
    }
    // Refused before any key is read (too many methods named): the same.
    let mut extra = spoofed.to_vec();
    extra.push(("x-http-method-override", "A,B,C,D,E,F,G,H,I"));
    let Decision::Deny(denial) = decide(&p, "GET", "/v1/venues", &extra) else { panic!("allowed") };
    assert_eq!((denial.kind, denial.remove), (DenyKind::Forbidden, expected.map(Cow::Borrowed).to_vec()));
    // Nothing spoofed, nothing to remove.
    let Decision::Deny(denial) = decide(&p, "GET", "/v1/venues", &[("x-trace-id", "t1")]) else { panic!() };
    assert!(denial.remove.is_empty());
}

#[test]
fn a_refusal_keeps_an_identity_header_set_to_null() {
    let mut c = config();
    c["upstream"] = json!({"org_header": null});
    let p = policy_from(c);
    let Decision::Deny(denial) = decide(&p, "GET", "/v1/venues", &[("x-org-id", "o"), ("x-api-key-id", "k")]) else {
        panic!("allowed")
    };
    assert_eq!(denial.remove, vec!["x-api-key-id"], "x-org-id is no longer keygate's");
}

#[test]
fn trailers_named_like_a_credential_identity_or_override_header_are_removed_in_any_spelling() {
    let p = policy_from(config());
    let trailers = headers(&[
        ("authorization", "Basic eA=="),
        ("x-checksum", "1"),
        ("X_Org_Id", "org_evil"),
        ("x-org-id", "org_evil"),
        ("x-org-id", "again"),
        ("x.venue.id", "v_8"),
        ("x-api-key-scopes", "*"),
        ("x_api_key", "sk_live_other"),
        ("x-http-method-override", "DELETE"),
        ("x-rewrite-url", "/v1/reports/x"),
        ("grpc-status", "0"),
        ("x-org-ids", "near, but another name"),
    ]);
    assert_eq!(
        p.trailers_to_remove(&trailers),
        [
            "authorization",
            "X_Org_Id",
            "x-org-id",
            "x.venue.id",
            "x-api-key-scopes",
            "x_api_key",
            "x-http-method-override",
            "x-rewrite-url"
        ]
    );
    assert!(p.trailers_to_remove(&headers(&[("x-checksum", "1"), ("te", "trailers")])).is_empty());
}

#[test]
fn a_credential_trailer_is_removed_even_where_credentials_are_forwarded() {
    let mut c = config();
    c["upstream"] = json!({"org_header": null, "strip_credentials": false});
    let p = policy_from(c);
    let trailers = headers(&[("authorization", &bearer(READER)), ("x-org-id", "org_1"), ("x-api-key-id", "x")]);
    // keygate checked the key in the headers, never one in a trailer; `x-org-id` is no longer its.
    assert_eq!(p.trailers_to_remove(&trailers), ["authorization", "x-api-key-id"]);
}

#[test]
fn a_method_override_needs_what_the_method_it_names_needs() {
    let p = policy_from(config());
    // PLATFORM may POST nowhere that needs write:bookings; an override to GET on a GET-only route
    // needs the GET route's scope.
    for (extra, path) in [
        (vec![("x-http-method-override", "GET")], "/v1/venues/v_7/treatments"),
        (vec![("X-HTTP-Method", "get")], "/v1/venues/v_7/treatments"),
        (vec![("x-method-override", " GET ")], "/v1/venues/v_7/treatments"),
        (vec![], "/v1/venues/v_7/treatments?_method=GET"),
        (vec![], "/v1/venues/v_7/treatments?a=1&%5Fmethod=get"),
    ] {
        let mut headers = extra.clone();
        headers.push(("x-api-key", PLATFORM));
        let d = decide(&p, "POST", path, &headers);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{extra:?} {path}");
    }
    let d = decide(&p, "GET", "/v1/bookings", &[("x-http-method-override", "POST"), ("x-api-key", READER)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "GET overridden to POST needs write:bookings");
    assert_eq!(kind(&decide(&p, "POST", "/v1/venues/v_7/x?_method_x=GET", &[("x-api-key", PLATFORM)])), None);
}

#[test]
fn a_url_override_header_needs_what_the_path_it_names_needs() {
    let p = policy_from(config_with_docs());
    for name in ["x-original-url", "X-Rewrite-URL"] {
        let d = decide(&p, "GET", "/docs/x", &[(name, "/v1/venues/v_8/treatments")]);
        assert_eq!(kind(&d), Some(DenyKind::MissingKey), "{name}");
        let d = decide(&p, "GET", "/v1/venues/v_7/x", &[(name, "/v1/venues/v_8/x?a=1"), ("x-api-key", READER)]);
        assert_eq!(kind(&d), Some(DenyKind::Forbidden), "{name}");
    }
}

#[test]
fn a_key_under_another_scheme_is_not_accepted_but_stripped() {
    let p = policy_from(config_with_docs());
    let token = format!("Token {READER}");
    assert_eq!(kind(&decide(&p, "GET", "/v1/venues", &[("authorization", &token)])), Some(DenyKind::MissingKey));
    let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("authorization", &token)]) else { panic!() };
    assert_eq!(edits.remove, vec!["authorization"]);
    let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("authorization", "Basic eA==")]) else {
        panic!()
    };
    assert!(edits.remove.is_empty(), "another scheme without a key is the upstream's");
}

#[test]
fn a_request_naming_too_many_methods_or_paths_is_refused() {
    let p = policy_from(config_with_docs());
    let many: String = (0..9).map(|i| format!("_method=M{i}&")).collect();
    let d = decide(&p, "GET", &format!("/docs/x?{many}"), &[]);
    assert_eq!(kind(&d), Some(DenyKind::Forbidden));
    let few: String = (0..7).map(|i| format!("_method=M{i}&")).collect();
    assert_eq!(kind(&decide(&p, "GET", &format!("/docs/x?{few}"), &[])), None);
    let urls = [("x-original-url", "/docs/a"); 4];
    assert_eq!(kind(&decide(&p, "GET", "/docs/x", &urls)), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "GET", "/docs/x", &urls[..3])), None);
}

#[test]
fn a_dot_dot_that_removes_an_empty_segment_reaches_no_route_with_less_than_it_needs() {
    let p = policy_from(config_with_docs());
    // ASP.NET Core, Envoy's normalize_path and WHATWG URLs read `//..` as removing the empty segment
    // only: this is /v1/venues/v_8/treatments/docs/x to them, /docs/x once empty segments are dropped.
    let path = "/docs/../v1/venues/v_8/treatments//..//..//..//../docs/x";
    assert_eq!(kind(&decide(&p, "GET", path, &[])), Some(DenyKind::MissingKey));
    assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden));
}

#[test]
fn an_encoded_slash_kept_by_the_upstream_reaches_no_route_with_less_than_it_needs() {
    let p = policy_from(config_with_docs());
    // Decoded, `%2F..` walks back into /docs; kept encoded (ASP.NET Core, Envoy's normalize_path), the
    // final `..` removes that one segment and leaves the treatments route.
    let path = "/v1/venues/v_7/treatments/a%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fx/..";
    assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", PLATFORM)])), Some(DenyKind::InsufficientScope));
    assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), None);
    // Go's ServeMux decodes each segment: `%76enues` is `venues`, `v_7%2Fx` one segment.
    let d = decide(&p, "GET", "/v1/%76enues/v_7%2Fx/treatments", &[("x-api-key", PLATFORM)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope));
}

#[test]
fn a_leading_double_slash_read_as_an_authority_needs_what_the_rest_needs() {
    let p = policy_from(config_with_docs());
    // `new URL("//docs/v1/venues/v_8/treatments", base)` has host `docs` and that route's path.
    for path in ["//docs/v1/venues/v_8/treatments", "/\\docs/v1/venues/v_8/treatments", "///docs/v1/venues/v_8/x"] {
        assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden), "{path}");
    }
    let d = decide(&p, "GET", "//docs/v1/venues/v_7/treatments", &[("x-api-key", PLATFORM)]);
    assert_eq!(kind(&d), Some(DenyKind::InsufficientScope));
}

#[test]
fn a_percent_u_escape_reaches_no_route_with_less_than_it_needs() {
    let p = policy_from(config_with_docs());
    // IIS decodes `%u002e` to `.`, then resolves: /docs/../v1/venues/v_8/treatments.
    let path = "/docs/%u002e%u002e/v1/venues/v_8/treatments";
    assert_eq!(kind(&decide(&p, "GET", path, &[])), Some(DenyKind::MissingKey));
    assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden));
}

#[test]
fn a_method_override_in_any_spelling_needs_what_the_method_it_names_needs() {
    let p = policy_from(config());
    // CGI-style servers (Symfony's HTTP_X_HTTP_METHOD_OVERRIDE) read `_` and `.` as `-`.
    for name in ["x_http_method_override", "X_HTTP_Method", "x.method.override"] {
        let d = decide(&p, "POST", "/v1/venues/v_7/treatments", &[(name, "GET"), ("x-api-key", PLATFORM)]);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{name}");
    }
    // PHP decodes the name's escapes, drops leading spaces and reads ` ` and `.` as `_`.
    for query in
        ["_%6Dethod=GET", "_m%65thod=GET", ".method=GET", "+_method=GET", "%20.method=get", "a=%41&_method=GET"]
    {
        let d = decide(&p, "POST", &format!("/v1/venues/v_7/treatments?{query}"), &[("x-api-key", PLATFORM)]);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{query}");
    }
    assert_eq!(kind(&decide(&p, "POST", "/v1/venues/v_7/x?a=%41", &[("x-api-key", PLATFORM)])), None);
}

#[test]
fn a_url_override_in_any_spelling_needs_what_the_path_it_names_needs() {
    let p = policy_from(config_with_docs());
    for name in ["x_original_url", "X_Rewrite_URL", "x.original.url"] {
        let d = decide(&p, "GET", "/docs/x", &[(name, "/v1/venues/v_8/treatments")]);
        assert_eq!(kind(&d), Some(DenyKind::MissingKey), "{name}");
    }
}

#[test]
fn a_head_request_needs_what_its_get_needs_even_under_an_earlier_head_route() {
    let mut c = config();
    c["routes"].as_array_mut().unwrap().insert(0, json!({"methods": ["HEAD"], "path": "/v1/**", "public": true}));
    let p = policy_from(c);
    // Servers answer HEAD with their GET handler: the headers of the treatments reply leak otherwise.
    assert_eq!(kind(&decide(&p, "HEAD", "/v1/venues/v_7/treatments", &[])), Some(DenyKind::MissingKey));
    let d = decide(&p, "HEAD", "/v1/venues/v_8/treatments", &[("x-api-key", READER)]);
    assert_eq!(kind(&d), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "HEAD", "/v1/venues/v_7/treatments", &[("x-api-key", READER)])), None);
    let d = decide(&p, "GET", "/v1/venues/v_7/x", &[("x-http-method-override", "HEAD"), ("x-api-key", READER)]);
    assert_eq!(kind(&d), None);
}

#[test]
fn a_key_in_a_basic_credential_is_stripped() {
    let p = policy_from(config_with_docs());
    // Stripe-style APIs take `-u sk_live_…:` as the key: base64 of `<key>:`, and of `user:<key>`.
    let as_user = format!("Basic {}", "c2tfbGl2ZV9hYWFhMDAwMV9yZWFkZXI6");
    let as_password = format!("basic  {}", "dTpza19saXZlX2FhYWEwMDAxX3JlYWRlcg==");
    let joined = format!("Digest x, {as_user}");
    for value in [&as_user, &as_password, &joined] {
        let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("authorization", value)]) else {
            panic!("{value}")
        };
        assert_eq!(edits.remove, vec!["authorization"], "{value}");
        let d = decide(&p, "GET", "/v1/venues", &[("authorization", value)]);
        assert_eq!(kind(&d), Some(DenyKind::MissingKey), "{value}: not a credential keygate accepts");
    }
    let Decision::Allow { edits, .. } = decide(&p, "GET", "/docs/x", &[("authorization", "Basic dXNlcjpwYXNz")]) else {
        panic!()
    };
    assert!(edits.remove.is_empty(), "a Basic credential without a key is the upstream's");
}

#[test]
fn a_path_resolved_then_decoded_and_resolved_again_needs_what_that_reading_needs() {
    let p = policy_from(config_with_docs());
    // nginx decodes and resolves (`q%2F..` walks back over `v_8` and the first `%252e%252e`), then the
    // application decodes and resolves what is left: /v1/venues/zz/docs, venue `zz`.
    let path = "/v1/zz/%252e%252e/venues/zz/%252e%252e/v_8/q%2F..%2F..%2F..%2Fdocs%2Fa/..";
    assert_eq!(kind(&decide(&p, "GET", path, &[("x-api-key", READER)])), Some(DenyKind::Forbidden));
}

#[test]
fn a_long_path_that_needs_reading_is_refused() {
    let p = policy_from(config_with_docs());
    let key = [("x-api-key", READER)];
    let long = format!("/docs/{}", "a".repeat(crate::routes::MAX_READ_PATH));
    assert_eq!(kind(&decide(&p, "GET", &long, &[])), None, "a long path in normal form is read as it is");
    let odd = format!("/docs/{}", "a/..%2F".repeat(crate::routes::MAX_READ_PATH / 7));
    assert_eq!(kind(&decide(&p, "GET", &odd, &key)), Some(DenyKind::Forbidden));
    assert_eq!(kind(&decide(&p, "GET", "/docs/x", &[("x-original-url", &odd)])), Some(DenyKind::Forbidden));
    let within = format!("/docs/{}", "a/..%2F".repeat(crate::routes::MAX_READ_PATH / 8));
    assert_eq!(kind(&decide(&p, "GET", &within, &key)), None);
    // The path and the URL overrides share one budget.
    let d = decide(&p, "GET", &within, &[("x-original-url", &within), ("x-api-key", READER)]);
    assert_eq!(kind(&d), Some(DenyKind::Forbidden));
}

#[test]
fn a_letter_that_full_case_folding_takes_to_two_needs_what_they_need() {
    let mut c = config();
    c["routes"].as_array_mut().unwrap().insert(0, json!({"path": "/v1/access/**", "scopes": ["admin"]}));
    let p = policy_from(c);
    // Python's `casefold` (and JavaScript's `toUpperCase`) read `ß` as `ss`.
    for path in ["/v1/acce%C3%9F/x", "/v1/ACCE\u{1e9e}/x"] {
        let d = decide(&p, "GET", path, &[("x-api-key", PLATFORM)]);
        assert_eq!(kind(&d), Some(DenyKind::InsufficientScope), "{path}");
    }
}

#[test]
fn a_refusal_renders_its_reply_with_the_request_id_and_logs_no_key() {
    let mut config = config();
    config["errors"] = json!({"body": {"error": "{code}", "request_id": "{request_id}"}});
    let policy = policy_from(config);
    let h = headers(&[(":method", "GET"), (":path", "/v1/venues/v_7/x"), ("x-request-id", "rid-9")]);
    let view = RequestView::from_headers(&h);
    let Decision::Deny(denial) = policy.decide(&policy.keys, &view, &|| Some(500)) else { panic!("allowed") };
    let reply = policy.reply(&denial, &view);
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body, r#"{"error":"missing_api_key","request_id":"rid-9"}"#);
    assert_eq!(denial.log_line(), "keygate: denied missing_key");
    let with_id = Denial { key_id: Some("0000bbbb".into()), ..Denial::new(DenyKind::InsufficientScope) };
    assert_eq!(with_id.log_line(), "keygate: denied insufficient_scope for key 0000bbbb");
    assert_eq!(
        crate::reply::internal_error_body("header edit failed"),
        r#"{"error":"internal_error","message":"header edit failed"}"#
    );
}
