use keygate::keys::hash_key;
use keygate::policy::{Decision, Policy, RequestView};
use std::time::Instant;
fn main() {
    let key = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
    let hash = hex::encode(hash_key(key.as_bytes()));
    let config = format!(
        r#"{{"credential": {{"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]}},
      "keys": [{{"id": "0000aaaa", "hash": "{hash}", "org": "org_42", "scopes": ["venues:read", "treatments:read"], "attributes": {{"venue": "v_7"}}}}],
      "routes": [{{"path": "/healthz", "public": true}},
        {{"methods": ["GET"], "path": "/v1/venues", "scopes": ["venues:read"]}},
        {{"methods": ["GET"], "path": "/v1/venues/{{venue_id}}/treatments", "scopes": ["treatments:read"], "bind": {{"venue_id": "venue"}}}},
        {{"path": "/v1/venues/{{venue_id}}/**", "scopes": ["venues:read"], "bind": {{"venue_id": "venue"}}}}],
      "upstream": {{"attribute_headers": {{"venue": "x-venue-id"}}}}}}"#
    );
    let p = Policy::from_json(config.as_bytes()).unwrap();
    let h = |pairs: &[(&str, &str)]| -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
    };
    let auth = format!("Bearer {key}");
    let req = h(&[
        (":method", "GET"),
        (":path", "/v1/venues/v_7/treatments"),
        (":authority", "api"),
        (":scheme", "http"),
        ("user-agent", "wrk"),
        ("accept", "*/*"),
        ("authorization", &auth),
        ("x-request-id", "abc"),
        ("x-forwarded-proto", "http"),
    ]);
    let n: usize = std::env::var("N").ok().and_then(|v| v.parse().ok()).unwrap_or(2_000_000);
    for _ in 0..1 {
        let t = Instant::now();
        let mut ok = 0;
        for _ in 0..n {
            if let Decision::Allow { .. } = p.decide(&p.keys, &RequestView::from_headers(&req), &|| Some(0)) {
                ok += 1;
            }
        }
        println!("{:.1} ns/decide ({ok})", t.elapsed().as_nanos() as f64 / n as f64);
    }
}
