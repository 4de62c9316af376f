//! Unit tests of configuration parsing and compilation: every rejection names its field.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::*;
use crate::keys::record::parse_hash;
use crate::plugin::Plugin;
use crate::policy::Policy;
use crate::reply::DenyKind;
use serde_json::{json, Value};

/// The policy a configuration compiles to.
fn policy_of(text: &[u8]) -> Result<Policy, ConfigError> {
    Plugin::from_json(text).map(|p| p.policy)
}

const HASH: &str = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const HASH2: &str = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";

fn error_of(config: Value) -> String {
    match Plugin::from_json(config.to_string().as_bytes()) {
        Ok(_) => panic!("expected {config} to be rejected"),
        Err(e) => e.to_string(),
    }
}

fn key(id: &str, hash: &str) -> Value {
    json!({"id": id, "hash": hash, "org": "org_1"})
}

#[test]
fn the_issue_example_compiles() {
    let text = json!({
      "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"], "max_length": 256},
      "keys": [
        {"id": "ab12cd34", "hash": HASH, "org": "org_42", "name": "Production server", "scopes": ["venues:read"],
         "attributes": {"venue": "v_7"}, "expires_at": "2027-01-01T00:00:00Z", "revoked": false}
      ],
      "routes": [
        {"methods": ["GET"], "path": "/v1/venues/{venue_id}/treatments", "scopes": ["treatments:read"],
         "bind": {"venue_id": "venue"}},
        {"path": "/healthz", "public": true}
      ],
      "unmatched": "authenticate",
      "scope_implies": {"read_write": ["read"]},
      "upstream": {"strip_credentials": true, "org_header": "x-org-id", "key_id_header": "x-api-key-id",
                   "scopes_header": "x-api-key-scopes", "attribute_headers": {"venue": "x-venue-id"}},
      "errors": {
        "body": {"error": "{code}", "message": "{message}"},
        "insufficient_scope": {"status": 403, "code": "insufficient_scope", "message": "Missing scope: {missing_scopes}",
                               "body": {"error": "{message}", "missing": "{missing_scopes}"}}
      }
    });
    let p = policy_of(text.to_string().as_bytes()).unwrap();
    assert_eq!(p.keys.len(), 1);
    let reply = p.replies.render(DenyKind::InsufficientScope, &["treatments:read"], "");
    assert_eq!(reply.body, r#"{"error":"Missing scope: treatments:read","missing":["treatments:read"]}"#);
}

#[test]
fn defaults_apply_to_an_empty_object() {
    let p = policy_of(b"{}").unwrap();
    assert_eq!(p.credential_headers, vec![crate::credential::CredentialHeader::new("authorization")]);
    assert_eq!(p.format.max_length, 256);
    assert!(p.format.prefixes.is_empty());
    assert_eq!(p.upstream.identity_headers, vec!["x-org-id", "x-api-key-id", "x-api-key-scopes"]);
    let expect = [
        (DenyKind::MissingKey, 401, "missing_api_key"),
        (DenyKind::InvalidKey, 401, "invalid_api_key"),
        (DenyKind::RevokedKey, 401, "invalid_api_key"),
        (DenyKind::ExpiredKey, 401, "expired_api_key"),
        (DenyKind::InsufficientScope, 403, "insufficient_scope"),
        (DenyKind::Forbidden, 403, "forbidden"),
        (DenyKind::KeySetUnavailable, 503, "key_set_unavailable"),
    ];
    for (kind, status, code) in expect {
        let spec = p.replies.spec(kind).unwrap();
        assert_eq!((spec.status, spec.code.as_str()), (status, code), "{kind:?}");
    }
}

#[test]
fn revoked_key_answers_exactly_like_an_invalid_one() {
    let p = policy_of(br#"{"errors": {"invalid_key": {"status": 403, "message": "Nope"}}}"#).unwrap();
    let invalid = p.replies.render(DenyKind::InvalidKey, &[], "r");
    let revoked = p.replies.render(DenyKind::RevokedKey, &[], "r");
    assert_eq!(invalid, revoked);
    assert_eq!(invalid.status, 403);
    let p = policy_of(br#"{"errors": {"revoked_key": {"code": "revoked"}}}"#).unwrap();
    assert_eq!(p.replies.spec(DenyKind::RevokedKey).unwrap().code, "revoked");
}

#[test]
fn expiry_accepts_unix_seconds_and_rfc3339() {
    let keys = json!({"keys": [
        {"id": "a", "hash": HASH, "org": "o", "expires_at": 1_798_761_600},
        {"id": "b", "hash": HASH2, "org": "o", "expires_at": "2027-01-01T00:00:00Z"}
    ]});
    let p = policy_of(keys.to_string().as_bytes()).unwrap();
    use crate::keys::{KeySource, Lookup};
    for h in [HASH, HASH2] {
        let Lookup::Found(k) = p.keys.lookup(&parse_hash(h).unwrap()) else { panic!("missing") };
        assert_eq!(k.expires_at_ms, Some(1_798_761_600_000));
    }
}

#[test]
fn rejections_name_the_field() {
    let cases: Vec<(Value, &str)> = vec![
        (json!({"keys": [key("a", "zz")]}), "keys[0].hash: expected 64 hex characters"),
        (json!({"keys": [key("a", &HASH[..63])]}), "keys[0].hash: expected 64 hex characters"),
        (json!({"keys": [key("a", HASH), key("a", HASH2)]}), "keys[1].id: duplicate id \"a\" (also keys[0])"),
        (
            json!({"keys": [key("a", HASH), key("b", &HASH.to_uppercase())]}),
            "keys[1].hash: duplicate hash (also keys[0])",
        ),
        (json!({"keys": [{"id": "a", "hash": HASH}]}), "keys[0]: missing field `org`"),
        (
            json!({"keys": [{"id": "a", "hash": HASH, "org": "o", "secret": "x"}]}),
            "keys[0].secret: unknown field `secret`",
        ),
        (
            json!({"keys": [{"id": "a", "hash": HASH, "org": "o", "expires_at": "tomorrow"}]}),
            "keys[0].expires_at: expected an RFC 3339",
        ),
        (json!({"keys": [{"id": "a", "hash": HASH, "org": "o", "scopes": ["a b"]}]}), "keys[0].scopes[0]:"),
        (json!({"keys": [{"id": "a", "hash": HASH, "org": "o\n"}]}), "keys[0].org:"),
        (json!({"credential": {"header": ["x"]}}), "credential.header: unknown field `header`"),
        (json!({"credential": {"headers": []}}), "credential.headers: must list at least one header"),
        (json!({"credential": {"headers": ["bad header"]}}), "credential.headers[0]:"),
        (json!({"credential": {"max_length": 0}}), "credential.max_length:"),
        (json!({"routes": [{"path": "v1"}]}), "routes[0].path: must start with '/'"),
        (json!({"routes": [{"path": "/a/{id}", "bind": {"venue_id": "venue"}}]}), "routes[0].bind.venue_id: the path"),
        (json!({"routes": [{"path": "/a", "public": true, "scopes": ["x"]}]}), "routes[0].public:"),
        (json!({"routes": [{"path": "/a", "methods": ["G T"]}]}), "routes[0].methods[0]:"),
        (json!({"unmatched": "allow"}), "unmatched: unknown variant `allow`"),
        (json!({"scope_implies": {"a": ["b c"]}}), "scope_implies.a[0]:"),
        (
            json!({"upstream": {"org_header": "authorization"}}),
            "upstream.org_header: \"authorization\" is also a credential header",
        ),
        (
            json!({"upstream": {"key_id_header": "x-org-id"}}),
            "upstream.key_id_header: \"x-org-id\" is already used by upstream.org_header",
        ),
        (json!({"upstream": {"attribute_headers": {"venue": "Bad Name"}}}), "upstream.attribute_headers.venue:"),
        (json!({"errors": {"teapot": {}}}), "errors.teapot: unknown field `teapot`"),
        (json!({"errors": {"forbidden": {"status": 200}}}), "errors.forbidden.status: must be between 400 and 599"),
        (
            json!({"errors": {"forbidden": {"message": "{nope}"}}}),
            "errors.forbidden.message: unknown placeholder {nope}",
        ),
        (
            json!({"errors": {"forbidden": {"message": "{message}"}}}),
            "errors.forbidden.message: unknown placeholder {message}",
        ),
        (json!({"errors": {"body": {"e": "{oops}"}}}), "errors.body: unknown placeholder {oops}"),
        (json!({"errors": {"expired_key": {"body": ["{code"]}}}), "errors.expired_key.body: unclosed"),
    ];
    for (config, expected) in cases {
        let error = error_of(config.clone());
        assert!(error.starts_with(expected), "{config}\n  got:      {error}\n  expected: {expected}…");
    }
}

#[test]
fn text_that_is_not_one_json_object_is_rejected() {
    for (text, expected) in [
        ("", "configuration is empty"),
        ("   ", "configuration is empty"),
        ("{", "EOF while parsing"),
        ("{} {}", "trailing characters"),
        ("[]", "expected a JSON object"),
    ] {
        let error = policy_of(text.as_bytes()).unwrap_err().to_string();
        assert!(error.contains(expected), "{text:?}: {error}");
    }
}

#[test]
fn error_messages_never_quote_a_hash() {
    let error = error_of(json!({"keys": [key("a", HASH), key("b", HASH)]}));
    assert!(!error.contains(HASH), "{error}");
}

#[test]
fn a_name_repeated_inside_an_object_is_rejected_naming_it() {
    let key =
        format!(r#"{{"id": "a", "hash": "{HASH}", "org": "o", "attributes": {{"venue": "v_7", "venue": "v_8"}}}}"#);
    for (text, expected) in [
        (format!(r#"{{"keys": [{key}]}}"#), "keys[0].attributes.venue: repeated name \"venue\""),
        (
            r#"{"routes": [{"path": "/v/{venue_id}", "bind": {"venue_id": "venue", "venue_id": "none"}}]}"#.to_string(),
            "routes[0].bind.venue_id: repeated name \"venue_id\"",
        ),
        (r#"{"scope_implies": {"rw": ["read"], "rw": []}}"#.to_string(), "scope_implies.rw: repeated name \"rw\""),
        (
            r#"{"upstream": {"attribute_headers": {"venue": "x-venue-id", "venue": null}}}"#.to_string(),
            "upstream.attribute_headers.venue: repeated name \"venue\"",
        ),
    ] {
        let error = policy_of(text.as_bytes()).unwrap_err().to_string();
        assert!(error.starts_with(expected), "{text}\n  got:      {error}\n  expected: {expected}…");
    }
}

#[test]
fn a_placeholder_in_a_body_object_key_is_rejected() {
    for body in [json!({"{code}": "x"}), json!({"{nope}": "x"}), json!({"a": {"{status}": 1}})] {
        let error = error_of(json!({"errors": {"body": body}}));
        assert!(error.starts_with("errors.body: object key"), "{error}");
    }
    let error = error_of(json!({"errors": {"forbidden": {"body": {"x{request_id}": 1}}}}));
    assert!(error.starts_with("errors.forbidden.body: object key \"x{request_id}\""), "{error}");
}

#[test]
fn identity_headers_that_differ_only_by_underscores_are_rejected() {
    let error = error_of(json!({"upstream": {"org_header": "x_api_key_id"}}));
    assert_eq!(error, "upstream.key_id_header: \"x-api-key-id\" is already used by upstream.org_header");
    let error = error_of(json!({"credential": {"headers": ["x-api-key"]}, "upstream": {"org_header": "x_api_key"}}));
    assert_eq!(error, "upstream.org_header: \"x_api_key\" is also a credential header, \"x-api-key\", to servers that read '_' as '-'");
}

#[test]
fn a_route_an_earlier_route_leaves_nothing_to_match_is_rejected() {
    let error = error_of(json!({"routes": [
        {"path": "/healthz", "public": true},
        {"path": "/v1/venues/{venue_id}/**", "scopes": ["venues:read"]},
        {"methods": ["POST"], "path": "/v1/venues/{v}/bookings", "scopes": ["bookings:write"]}
    ]}));
    assert!(error.starts_with("routes[2]: never matches: routes[1] comes first"), "{error}");
    let error = error_of(json!({"routes": [{"path": "/v1/{x}"}, {"methods": ["GET"], "path": "/V1/venues"}]}));
    assert!(error.starts_with("routes[1]: never matches: routes[0]"), "{error}");
    // Narrower first, or a method the earlier route does not cover: fine.
    for ok in [
        json!({"routes": [{"methods": ["POST"], "path": "/v1/venues/{v}/bookings"}, {"path": "/v1/venues/{v}/**"}]}),
        json!({"routes": [{"methods": ["GET"], "path": "/v1/venues/{v}/**"}, {"methods": ["POST"], "path": "/v1/venues/{v}/x"}]}),
        json!({"routes": [{"methods": ["GET"], "path": "/v1/venues/{v}/**"}, {"path": "/v1/venues/{v}/x"}]}),
    ] {
        assert!(policy_of(ok.to_string().as_bytes()).is_ok(), "{ok}");
    }
}
