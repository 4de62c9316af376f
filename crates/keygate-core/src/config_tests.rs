//! Unit tests of configuration parsing and compilation: every rejection names its field.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use crate::error::{ConfigErrors, ErrorKind};
use crate::keys::record::parse_hash;
use crate::plugin::Plugin;
use crate::policy::Policy;
use crate::reply::DenyKind;
use serde_json::{json, Value};

/// The policy a configuration compiles to.
fn policy_of(text: &[u8]) -> Result<Policy, ConfigErrors> {
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
        (
            json!({"keys": [{"id": "a", "hash": HASH, "org": "o", "created_at": 1_798_761_600}]}),
            "keys[0].created_at: invalid type: integer",
        ),
        (
            json!({"keys": [{"id": "a", "hash": HASH, "org": "o", "preview": "sk_live_a_0123456789abcdef"}]}),
            "keys[0].preview: expected the key's public part",
        ),
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

/// Every problem of a configuration, as (field, kind).
fn problems_of(config: Value) -> Vec<(String, ErrorKind)> {
    match Plugin::from_json(config.to_string().as_bytes()) {
        Ok(_) => panic!("expected {config} to be rejected"),
        Err(errors) => errors.into_iter().map(|e| (e.field, e.kind)).collect(),
    }
}

fn invalid(field: &str) -> (String, ErrorKind) {
    (field.to_string(), ErrorKind::Invalid)
}

fn duplicate(field: &str, of: &str) -> (String, ErrorKind) {
    (field.to_string(), ErrorKind::Duplicate { of: of.to_string() })
}

#[test]
fn one_compile_reports_every_problem_in_the_order_of_its_steps() {
    let config = json!({
        "credential": {"headers": ["x-api-key", "bad header", "X-Api-Key"], "max_length": 0},
        "keys": [key("a", HASH), key("b", "zz"), key("a", HASH2), {"id": "c", "hash": HASH, "org": " o"}],
        "routes": [
            {"path": "v1", "methods": [], "scopes": ["a b"]},
            {"path": "/v1/{id}", "bind": {"venue": "venue"}},
            {"path": "/x"},
            {"path": "/x"}
        ],
        "scope_implies": {"rw": ["r w"]},
        "upstream": {"org_header": "x-api-key", "key_id_header": "x_api_key_id"},
        "errors": {"forbidden": {"status": 200, "message": "{nope}"}, "body": {"e": "{oops}"}}
    });
    assert_eq!(
        problems_of(config),
        [
            // Met while the records were read.
            invalid("keys[1].hash"),
            duplicate("keys[2].id", "keys[0]"),
            invalid("keys[3].org"),
            duplicate("keys[3].hash", "keys[0]"),
            invalid("credential.headers[1]"),
            duplicate("credential.headers[2]", "credential.headers[0]"),
            invalid("credential.max_length"),
            invalid("routes[0].path"),
            invalid("routes[0].methods"),
            invalid("routes[0].scopes[0]"),
            invalid("routes[1].bind.venue"),
            invalid("routes[3]"),
            invalid("scope_implies.rw[0]"),
            duplicate("upstream.org_header", "credential.headers"),
            invalid("errors.body"),
            invalid("errors.forbidden.status"),
            invalid("errors.forbidden.message"),
        ]
    );
}

#[test]
fn several_problems_show_the_first_as_a_lone_one_would_then_how_many_more() {
    let error = error_of(json!({"keys": [key("a", "zz")], "routes": [{"path": "v1"}]}));
    assert_eq!(error, "keys[0].hash: expected 64 hex characters (a SHA-256), got 2 (and 1 more problem)");
    let error = error_of(json!({"keys": [key("a", "zz")]}));
    assert_eq!(error, "keys[0].hash: expected 64 hex characters (a SHA-256), got 2");
}

#[test]
fn a_duplicate_names_the_first_record_with_that_id_or_hash() {
    let config = json!({"keys": [key("a", HASH), key("b", HASH2), key("a", &HASH.to_uppercase()), key("a", HASH2)]});
    assert_eq!(
        problems_of(config),
        [
            duplicate("keys[2].id", "keys[0]"),
            duplicate("keys[2].hash", "keys[0]"),
            duplicate("keys[3].id", "keys[0]"),
            duplicate("keys[3].hash", "keys[1]"),
        ]
    );
}

#[test]
fn a_record_with_a_bad_field_still_has_its_id_checked() {
    let config = json!({"keys": [key("a", HASH), {"id": "a", "hash": HASH2, "org": "o", "scopes": ["a b"]}]});
    assert_eq!(problems_of(config), [invalid("keys[1].scopes[0]"), duplicate("keys[1].id", "keys[0]")]);
}

#[test]
fn an_inherited_reply_setting_is_refused_once_where_it_is_written() {
    let config = json!({"errors": {"invalid_key": {"status": 700, "message": "{nope}", "body": {"{x}": 1}}}});
    assert_eq!(
        problems_of(config),
        [
            invalid("errors.invalid_key.status"),
            invalid("errors.invalid_key.message"),
            invalid("errors.invalid_key.body")
        ]
    );
}

#[test]
fn reading_errors_have_a_kind_and_a_position() {
    let text = "{\"keys\": [\n  {\"id\": \"a\", \"hash\": \"x\"}\n]}";
    let e = Plugin::from_json(text.as_bytes()).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), &e.kind), ("keys[0]", &ErrorKind::Missing { name: "org".into() }));
    assert_eq!(e.position, Some(crate::error::Position { line: 2, column: 26 }));
    assert_eq!(e.to_string(), "keys[0]: missing field `org` at line 2 column 26");

    let e = policy_of(br#"{"keys": [{"id": "a", "hash": "x", "org": "o", "secret": 1}]}"#).unwrap_err().into_first();
    assert_eq!(e.field, "keys[0].secret");
    let ErrorKind::Unknown { allowed } = e.kind else { panic!("{e:?}") };
    assert_eq!(
        allowed,
        ["id", "hash", "org", "name", "scopes", "attributes", "expires_at", "revoked", "created_at", "preview"]
    );

    let e = policy_of(br#"{"unmatched": "allow"}"#).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), e.kind), ("unmatched", ErrorKind::Unknown { allowed: &["authenticate", "deny"] }));
    let e = policy_of(br#"{"routes": [{"path": 7}]}"#).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), e.kind), ("routes[0].path", ErrorKind::Type));
    let e = policy_of(br#"{"errors": {"forbidden": {"status": 70000}}}"#).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), e.kind), ("errors.forbidden.status", ErrorKind::Invalid));
    let e = policy_of(br#"{"keys": [], "keys": []}"#).unwrap_err().into_first();
    assert_eq!((e.field.as_str(), e.kind), ("", ErrorKind::Duplicate { of: "keys".into() }));
    let e = policy_of(br#"{"scope_implies": {"rw": [], "rw": []}}"#).unwrap_err().into_first();
    assert_eq!(
        (e.field.as_str(), e.kind),
        ("scope_implies.rw", ErrorKind::Duplicate { of: "scope_implies.rw".into() })
    );
    let e = policy_of(b"{\n  \"keys\": [\n}").unwrap_err().into_first();
    assert_eq!((e.field.as_str(), &e.kind), ("keys[0]", &ErrorKind::Syntax));
    assert_eq!(e.position, Some(crate::error::Position { line: 3, column: 1 }));
}

#[test]
fn reading_stops_at_the_first_problem_of_the_text() {
    // The records' problems are met first, but a problem of the text after them ends the reading,
    // and only it is reported.
    let errors = policy_of(json!({"keys": [key("a", "zz")], "unmatched": "x"}).to_string().as_bytes()).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors.first().field, "unmatched");
}
