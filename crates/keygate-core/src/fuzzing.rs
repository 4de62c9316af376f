//! Entry points for the fuzz targets (`fuzz/`) and for replaying the inputs they saved
//! (`tests/fuzz_regressions.rs`). Each must return normally for every input: a panic is a finding.

use crate::credential::{extract, CredentialHeader, KeyFormat};
use crate::keys::hash_key;
use crate::keys::stored::decode_key;
use crate::live::{parse_manifest, parse_shard, Lease, ShardIndex, ShardRef, SyncState, DEFAULT_MAX_MANIFEST_BYTES};
use crate::plugin::Plugin;
use crate::policy::{Decision, Policy, RequestView};
use crate::routes::{Case, PathPattern, PathViews};
use std::sync::OnceLock;

/// A policy with every kind of rule, built once.
fn policy() -> &'static Option<Policy> {
    static POLICY: OnceLock<Option<Policy>> = OnceLock::new();
    POLICY.get_or_init(|| {
        let hash = hex::encode(hash_key(b"sk_live_aaaa0001_fuzz"));
        let config = format!(
            r#"{{"credential": {{"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]}},
               "keys": [{{"id": "aaaa0001", "hash": "{hash}", "org": "o", "scopes": ["read:*"], "attributes": {{"venue": "v_7"}},
                          "expires_at": 1900000000}}],
               "routes": [{{"path": "/healthz", "public": true}},
                          {{"methods": ["GET"], "path": "/v1/venues/{{venue_id}}/x", "scopes": ["read:x"], "bind": {{"venue_id": "venue"}}}},
                          {{"path": "/v1/orgs/{{org_id}}/**", "bind": {{"org_id": "org"}}}}],
               "unmatched": "deny"}}"#
        );
        Plugin::from_json(config.as_bytes()).ok().map(|p| p.policy)
    })
}

/// Splits fuzz input into header lines `name:value` (a leading `:method`/`:path` pair included).
fn headers_of(data: &[u8]) -> Vec<(String, Vec<u8>)> {
    data.split(|&c| c == b'\n')
        .filter_map(|line| {
            let colon = line.iter().skip(1).position(|&c| c == b':')? + 1;
            let (name, value) = line.split_at(colon);
            let name = String::from_utf8(name.to_ascii_lowercase()).ok()?;
            Some((name, value.get(1..).unwrap_or_default().to_vec()))
        })
        .collect()
}

/// Credential extraction, the key format check, and the whole decision, on arbitrary headers.
pub fn credential(data: &[u8]) {
    let headers = headers_of(data);
    let configured = [CredentialHeader::new("authorization"), CredentialHeader::new("x-api-key")];
    let _ = extract(&configured, &headers);
    let format = KeyFormat { prefixes: vec!["sk_live_".into()], max_length: 256 };
    for (_, v) in &headers {
        let _ = format.accepts(v);
    }
    if let Some(p) = policy() {
        let _ = p.decide(&p.keys, &RequestView::from_headers(&headers), &|| Some(0));
    }
}

/// Path readings and route matching on an arbitrary path; the decision must never allow a path whose
/// normal form it would refuse.
pub fn path(data: &[u8]) {
    let views = PathViews::of(data);
    for pattern in ["/v1/venues/{venue_id}/x", "/v1/orgs/{org_id}/**", "/", "/**"] {
        if let Ok(p) = PathPattern::parse(pattern) {
            for reading in views.all() {
                let _ = p.matches(reading, Case::Exact);
                let _ = p.matches(reading, Case::Folded);
            }
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = PathPattern::parse(text);
    }
    let Some(p) = policy() else { return };
    let request = |path: &[u8]| {
        vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), path.to_vec()),
            ("x-api-key".to_string(), b"sk_live_aaaa0001_fuzz".to_vec()),
        ]
    };
    let allowed = |h: &[(String, Vec<u8>)]| {
        matches!(p.decide(&p.keys, &RequestView::from_headers(h), &|| Some(0)), Decision::Allow { .. })
    };
    if !allowed(&request(data)) {
        return;
    }
    // Every reading, written out plainly, is allowed too: none needs more than the spelling got.
    for reading in views.all() {
        let plain: Vec<u8> = reading.iter().flat_map(|s| [b"/".as_slice(), s.as_ref()].concat()).collect();
        let plain = if plain.is_empty() { b"/".to_vec() } else { plain };
        if plain.iter().any(|c| b"?#%;\\".contains(c))
            || reading.iter().any(|s| s.is_empty() || s.as_ref() == b"." || s.as_ref() == b"..")
        {
            continue;
        }
        assert!(allowed(&request(&plain)), "a spelling was allowed where one of its readings is refused");
    }
}

/// Configuration compilation on arbitrary bytes.
pub fn config(data: &[u8]) {
    let _ = Plugin::from_json(data);
}

/// The live key set's formats on arbitrary bytes: manifest, shard, stored records, lease, state.
/// Like the filter, it reads no manifest past the default `key_set.max_manifest_bytes`; within it,
/// each input must finish within the fuzzer's time budget (`make fuzz`: `-timeout`).
pub fn keyset(data: &[u8]) {
    if data.len() as u64 > DEFAULT_MAX_MANIFEST_BYTES {
        return;
    }
    let _ = parse_manifest(data);
    let shard = ShardRef { prefix: String::new(), path: "all.json".into(), etag: hash_key(data) };
    let _ = parse_shard(&shard, data);
    let _ = decode_key(data);
    let _ = Lease::decode(data);
    let _ = ShardIndex::decode(data);
    let _ = SyncState::decode(data);
}

/// A hostile manifest: `{"version": [` then `[[…]]` elements 100 deep, `len` bytes in all, the body
/// that once made the error path quadratic. The unit tests and the Envoy tests both serve it.
pub fn nested_manifest(len: usize) -> Vec<u8> {
    let mut body = br#"{"version": ["#.to_vec();
    let unit = format!("{}{},", "[".repeat(100), "]".repeat(100));
    while body.len() < len {
        body.extend_from_slice(unit.as_bytes());
    }
    body.extend_from_slice(br#"[]], "shards": []}"#);
    body
}
