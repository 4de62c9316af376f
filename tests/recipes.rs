//! Every recipe in envoy/recipes/ runs in a real Envoy and answers as its product's documentation says.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::{Envoy, Proto, Recorded, Response, Upstream};
use serde_json::{json, Value};

/// A recipe running in its own Envoy, with a recording upstream.
struct Recipe {
    upstream: Upstream,
    envoy: Envoy,
}

impl Recipe {
    fn start(name: &str) -> Recipe {
        let upstream = Upstream::start();
        let envoy = Envoy::start_config_file(format!("envoy/recipes/{name}.yaml"), upstream.port());
        Recipe { upstream, envoy }
    }

    /// Sends one request over `proto`; returns the reply and what the upstream received of it.
    fn send(&self, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)]) -> (Response, Vec<Recorded>) {
        self.upstream.clear();
        // Every recipe sets `headers_with_underscores_action: DROP_HEADER`: no header spelled with an
        // underscore (`x_org_id`, which CGI-style servers read as `x-org-id`) reaches the upstream.
        let mut headers = headers.to_vec();
        headers.push(("x_underscore_probe", "1"));
        let reply = common::send(self.envoy.port(), proto, method, path, &headers);
        (reply, self.upstream.requests())
    }

    /// Asserts the request is refused with exactly this status and JSON body, and not forwarded.
    fn refuses(&self, method: &str, path: &str, headers: &[(&str, &str)], status: u16, body: Value) {
        for proto in Proto::ALL {
            let (reply, seen) = self.send(proto, method, path, headers);
            assert_eq!(reply.status, status, "{proto:?} {method} {path}: {}", reply.body);
            let got: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{}: {e}", reply.body));
            assert_eq!(got, body, "{proto:?} {method} {path}");
            assert!(seen.is_empty(), "{proto:?} {method} {path} reached the upstream");
        }
    }

    /// Asserts the request is let through; returns what the upstream received (over HTTP/2).
    fn allows(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Recorded {
        let mut last = None;
        for proto in Proto::ALL {
            let (reply, seen) = self.send(proto, method, path, headers);
            assert_eq!(reply.status, 200, "{proto:?} {method} {path}: {}", reply.body);
            let [req] = seen.as_slice() else { panic!("{proto:?} {method} {path}: upstream saw {seen:#?}") };
            assert!(!req.has_header("authorization") && !req.has_header("x-api-key"), "the key reached the upstream");
            assert!(
                !req.has_header("x_underscore_probe"),
                "{proto:?} {method} {path}: an underscore header was forwarded"
            );
            last = Some(req.clone());
        }
        last.unwrap_or_else(|| unreachable!())
    }
}

fn bearer(key: &str) -> (&'static str, String) {
    ("authorization", format!("Bearer {key}"))
}

fn h<'a>(pairs: &'a [(&'a str, String)]) -> Vec<(&'a str, &'a str)> {
    pairs.iter().map(|(n, v)| (*n, v.as_str())).collect()
}

mod saoma {
    use super::*;
    const VENUE: &str = "sk_live_5a0a0001_daaa341228b084a9c575205600f74ea2ac422f0a3db8284dd9fe0a6f588b7fcb";
    const PLATFORM: &str = "sk_live_5a0a0002_6c8292410788caa11fba68f12752d01169b71b2c65d0bf7933c42f98479410fd";
    const REVOKED: &str = "sk_live_5a0a0003_fbdfbc6a406fac6dcd11c260a596cae3c0b1b21e5f931827f5c065591028eb3e";

    #[test]
    fn saoma_recipe_answers_as_documented() {
        let r = Recipe::start("saoma");
        // Either header works; Authorization takes precedence.
        let req = r.allows("GET", "/v1/venues/v_7/treatments", &h(&[bearer(VENUE)]));
        assert_eq!(req.header_values("x-venue-id"), ["v_7"]);
        assert_eq!(req.header_values("x-org-id"), ["org_saoma_1"]);
        let req = r.allows("GET", "/v1/venues", &[("x-api-key", PLATFORM)]);
        assert_eq!(req.header_values("x-api-key-id"), ["5a0a0002"]);
        let both = [bearer(VENUE), ("x-api-key", PLATFORM.to_string())];
        assert_eq!(r.allows("GET", "/v1/venues", &h(&both)).header_values("x-api-key-id"), ["5a0a0001"]);
        r.allows("GET", "/v1/venues/v_9/customers/c_1/bookings", &h(&[bearer(PLATFORM)]));

        let invalid = json!({"error": "Invalid or revoked API key"});
        r.refuses("GET", "/v1/venues", &h(&[bearer(REVOKED)]), 401, invalid.clone());
        r.refuses("GET", "/v1/venues", &[("x-api-key", "sk_live_5a0a0001_nope")], 401, invalid);
        r.refuses("GET", "/v1/venues", &[], 401, json!({"error": "Missing API key"}));
        r.refuses(
            "GET",
            "/v1/venues/v_7/customers/c_1/bookings",
            &h(&[bearer(VENUE)]),
            403,
            json!({"error": "Insufficient scope", "missing": ["bookings:read"]}),
        );
        r.refuses("GET", "/v1/venues/v_8/treatments", &h(&[bearer(VENUE)]), 403, json!({"error": "Forbidden"}));
        r.refuses("POST", "/v1/venues", &h(&[bearer(PLATFORM)]), 403, json!({"error": "Forbidden"}));
    }
}

mod seaty {
    use super::*;
    const READ: &str = "sk_live_5ea70001_f5db4e891528f82401ca3b3760c8a7d254b9752971a624254d7aa2f8b304d056";
    const PAYMENTS: &str = "sk_live_5ea70002_5537d7d5d77c105732e8cbc003c24113fd14c0bb40b322ae19834436ffd7783c";
    const OTHER_ORG: &str = "sk_live_5ea70003_a0a476a23525c09bd69528979c0de66933e340439d81f7cc83979bf6f3f300f8";

    #[test]
    fn seaty_recipe_answers_as_documented() {
        let r = Recipe::start("seaty");
        let spoofed = [bearer(READ), ("x-org-id", "org_seaty_2".to_string())];
        assert_eq!(r.allows("GET", "/v1/events/e_1/orders", &h(&spoofed)).header_values("x-org-id"), ["org_seaty_1"]);
        assert_eq!(r.allows("GET", "/v1/events", &h(&[bearer(OTHER_ORG)])).header_values("x-org-id"), ["org_seaty_2"]);
        r.allows("POST", "/v1/events/e_1/balance-payments", &h(&[bearer(PAYMENTS)]));

        let unauthorized = |m: &str| json!({"error": "unauthorized", "message": m});
        r.refuses("GET", "/v1/events", &[], 401, unauthorized("No API key. Send it as Authorization: Bearer <key>."));
        // Only the Authorization header counts: no query-string keys, no X-API-Key.
        let path = format!("/v1/events?api_key={READ}");
        r.refuses(
            "GET",
            &path,
            &[("x-api-key", READ)],
            401,
            unauthorized("No API key. Send it as Authorization: Bearer <key>."),
        );
        r.refuses(
            "GET",
            "/v1/events",
            &h(&[bearer("sk_live_5ea70001_wrong")]),
            401,
            unauthorized("The API key is invalid or has been revoked."),
        );
        r.refuses(
            "POST",
            "/v1/events/e_1/balance-payments",
            &h(&[bearer(READ)]),
            403,
            json!({"error": "forbidden", "message": "This API key is missing the scope write:balance_payments."}),
        );
    }
}

mod setora {
    use super::*;
    const READ: &str = "sk_live_5e700001_7311a0527aca4f312acfbd261893b626373c113251e97a48fd83440777c74bd4";
    const READ_WRITE: &str = "sk_live_5e700002_24db719b9538aa2d48063d9ea2c85b2580b56df61c45799b13a364ca6ce445fa";

    fn envelope(code: &str, message: &str) -> Value {
        json!({"error": {"code": code, "message": message, "param": "Authorization"}})
    }

    #[test]
    fn setora_recipe_answers_as_documented() {
        let r = Recipe::start("setora");
        r.allows("GET", "/v1/locations", &h(&[bearer(READ)]));
        r.allows("GET", "/v1/bookings/bk_1", &h(&[bearer(READ_WRITE)]));
        r.allows("POST", "/v1/bookings", &h(&[bearer(READ_WRITE)]));
        r.refuses(
            "GET",
            "/v1/locations",
            &[],
            401,
            envelope("missing_api_key", "No API key was provided. Send it as Authorization: Bearer <key>."),
        );
        r.refuses(
            "GET",
            "/v1/locations",
            &h(&[bearer("sk_live_5e700001_revoked")]),
            401,
            envelope("invalid_api_key", "The provided API key is invalid or has been revoked."),
        );
        r.refuses(
            "DELETE",
            "/v1/bookings/bk_1",
            &h(&[bearer(READ)]),
            403,
            envelope("insufficient_scope", "The API key's scope does not permit this request (needs read_write)."),
        );
    }
}

mod skaala {
    use super::*;
    const READER: &str = "sk_live_ca1a0001_5309a8630953646a1b8f946a897bb4d947342bc1643afd720817320f8cf70e74";
    const WRITER: &str = "sk_live_ca1a0002_8fc0db8cc012663705e9e27f982cdb8a279f0121dee52da5d8c54c55560d0bae";
    const EXPIRED: &str = "sk_live_ca1a0003_b1dd522031d711107f35336b0624fb7766ed6bf05d9b33e252995a2ca2440a6f";

    #[test]
    fn skaala_recipe_answers_as_documented() {
        let r = Recipe::start("skaala");
        let req = r.allows("GET", "/api/v1/contacts", &h(&[bearer(READER)]));
        assert_eq!(req.header_values("x-team-id"), ["team_skaala_1"]);
        r.allows("GET", "/api/v1/teams/team_skaala_1/calls/c_1", &[("x-api-key", READER)]);
        r.allows("POST", "/api/v1/bookings", &h(&[bearer(WRITER)]));

        let unauthorized = json!({"error": "unauthorized", "message": "Invalid API key"});
        r.refuses("GET", "/api/v1/bookings", &h(&[bearer(EXPIRED)]), 401, unauthorized.clone());
        r.refuses("GET", "/api/v1/bookings", &h(&[bearer("pk_live_ca1a0001_x")]), 401, unauthorized);
        r.refuses("GET", "/api/v1/bookings", &[], 401, json!({"error": "unauthorized", "message": "Missing API key"}));
        let forbidden = json!({"error": "forbidden", "message": "Insufficient scopes"});
        r.refuses("POST", "/api/v1/bookings", &h(&[bearer(READER)]), 403, forbidden.clone());
        r.refuses("GET", "/api/v1/teams/team_skaala_1/staff", &h(&[bearer(WRITER)]), 403, forbidden.clone());
        r.refuses("GET", "/api/v1/teams/team_other/bookings", &h(&[bearer(READER)]), 403, forbidden.clone());
        r.refuses("POST", "/api/v1/webhooks", &h(&[bearer(READER)]), 403, forbidden);
    }
}

mod soku {
    use super::*;
    const PROD: &str = "sk_live_a2848423703e22530c4ee2b035644b20";
    const REVOKED: &str = "sk_live_2bdceb6077f6e5ab0f696a37e25cef25";

    #[test]
    fn soku_recipe_answers_as_documented() {
        let r = Recipe::start("soku");
        let req = r.allows("GET", "/v1/bookings", &h(&[bearer(PROD)]));
        assert_eq!(req.header_values("x-api-key-id"), ["prod-server"]);
        r.allows("POST", "/v1/anything/at/all", &h(&[bearer(PROD)]));
        let invalid = json!({"error": "unauthorized", "message": "Invalid or revoked API key."});
        r.refuses("GET", "/v1/bookings", &h(&[bearer(REVOKED)]), 401, invalid.clone());
        r.refuses("GET", "/v1/bookings", &h(&[bearer("sk_test_a2848423703e22530c4ee2b035644b20")]), 401, invalid);
        let missing =
            json!({"error": "unauthorized", "message": "Missing API key. Send it as Authorization: Bearer <key>."});
        r.refuses("GET", "/v1/bookings", &[], 401, missing);
    }
}

mod access_log {
    //! envoy/recipes/access-log.yaml: Envoy's access log names the key and organisation keygate
    //! set, and never an identity a client forged, on a refusal or on a request keygate never saw.
    use super::*;
    use common::envoy::{substitute_recipe, yaml_documents};
    use std::collections::BTreeMap;
    use std::time::Duration;

    const ACME: &str = "sk_live_acce5501_eda7248f1baf608f72da50405fb1a8ae5cac59d9263cb2375df1c2d81a63192a";
    const REVOKED: &str = "sk_live_acce5503_20d285cf5d33676a327da71d8e255c32a8d5bf668d929b4fd6866df9abb7c19c";
    const WRONG: &str = "sk_live_acce5502_0000000000000000000000000000000000000000000000000000000000000000";

    /// Another organisation's identity, as a client claims it: in the spellings Envoy's
    /// `%REQ(X-API-KEY-ID)%` reads (any case, repeated) and twins keygate removes (`x.org.id`;
    /// `X_Api_Key_Id`, which the recipe's `DROP_HEADER` drops first).
    const FORGED: [(&str, &str); 6] = [
        ("X-Api-Key-Id", "acce5502"),
        ("x-api-key-id", "acce5502"),
        ("X-Org-Id", "org_globex"),
        ("x-org-id", "org_globex"),
        ("x.org.id", "org_globex"),
        ("X_Api_Key_Id", "acce5502"),
    ];

    /// Sends, over each protocol and each with the forged identity, an accepted request (its key
    /// in the query too), a refusal of each kind, and a path Envoy itself redirects before any
    /// filter runs; returns the access log's lines by logged path, once every line is there.
    fn exchange(r: &Recipe) -> BTreeMap<String, Value> {
        let (acme, revoked, wrong) = (format!("Bearer {ACME}"), format!("Bearer {REVOKED}"), format!("Bearer {WRONG}"));
        let mut sent = 0;
        for proto in Proto::ALL {
            let p = format!("{proto:?}").to_lowercase();
            let cases = [
                ("GET", format!("/v1/{p}/accepted?api_key={ACME}"), Some(&acme), 200),
                ("GET", format!("/v1/{p}/missing"), None, 401),
                ("GET", format!("/v1/{p}/invalid"), Some(&wrong), 401),
                ("GET", format!("/v1/{p}/revoked"), Some(&revoked), 401),
                ("POST", format!("/v1/{p}/scope"), Some(&acme), 403),
                ("GET", format!("/v1/{p}/a%2Fb"), Some(&acme), 307),
            ];
            for (method, path, auth, status) in cases {
                let mut headers = FORGED.to_vec();
                headers.extend(auth.map(|a| ("authorization", a.as_str())));
                let (reply, seen) = r.send(proto, method, &path, &headers);
                sent += 1;
                assert_eq!(reply.status, status, "{proto:?} {method} {path}: {}", reply.body);
                if status == 200 {
                    let [req] = seen.as_slice() else { panic!("{proto:?} {path}: upstream saw {seen:#?}") };
                    assert_eq!(req.header_values("x-api-key-id"), ["acce5501"]);
                    assert_eq!(req.header_values("x-org-id"), ["org_acme"]);
                    assert!(!req.has_header("x.org.id") && !req.has_header("authorization"), "{req:#?}");
                } else {
                    assert!(seen.is_empty(), "{proto:?} {method} {path} reached the upstream");
                }
            }
        }
        let lines = r.envoy.wait_for_access_log(sent, Duration::from_secs(10));
        assert_eq!(lines.len(), sent, "one line per request: {lines:#?}");
        let by_path: BTreeMap<String, Value> = lines
            .iter()
            .map(|l| serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .map(|line| (line["path"].as_str().unwrap_or_else(|| panic!("no path: {line}")).to_string(), line))
            .collect();
        assert_eq!(by_path.len(), sent, "one line per path: {lines:#?}");
        let log = r.envoy.access_log();
        for key in [ACME, REVOKED, WRONG] {
            let secret = key.rsplit('_').next().unwrap();
            assert!(!log.contains(secret), "a key's secret in the access log:\n{log}");
        }
        by_path
    }

    /// The line of `path`, checked against what was sent; returns its (key_id, org).
    fn logged<'a>(lines: &'a BTreeMap<String, Value>, path: &str, method: &str, status: u16) -> (&'a Value, &'a Value) {
        let line = lines.get(path).unwrap_or_else(|| panic!("no line for {path}: {lines:#?}"));
        assert_eq!(
            (line["method"].as_str(), line["status"].as_u64()),
            (Some(method), Some(u64::from(status))),
            "{line}"
        );
        (&line["key_id"], &line["org"])
    }

    #[test]
    fn access_log_recipe_names_the_caller_keygate_set_and_never_a_forged_one() {
        let r = Recipe::start("access-log");
        let lines = exchange(&r);
        for (p, protocol) in [("http1", "HTTP/1.1"), ("http2", "HTTP/2")] {
            let accepted = format!("/v1/{p}/accepted");
            assert_eq!(logged(&lines, &accepted, "GET", 200), (&json!("acce5501"), &json!("org_acme")));
            assert_eq!(lines[&accepted]["protocol"], protocol);
            for (path, method, status) in
                [("missing", "GET", 401), ("invalid", "GET", 401), ("revoked", "GET", 401), ("scope", "POST", 403)]
            {
                let path = format!("/v1/{p}/{path}");
                assert_eq!(logged(&lines, &path, method, status), (&Value::Null, &Value::Null), "{path}");
            }
            // Answered by Envoy before the early header mutation and before any filter.
            let redirected = format!("/v1/{p}/a/b");
            assert_eq!(logged(&lines, &redirected, "GET", 307), (&Value::Null, &Value::Null));
            assert_eq!(lines[&redirected]["details"], "path_normalization_failed");
        }
        let log = r.envoy.access_log();
        assert!(!log.contains("acce5502") && !log.contains("org_globex"), "a forged identity logged:\n{log}");
    }

    /// The recipe as an operator might first write it: `%REQ(X-API-KEY-ID)%` and `%REQ(X-ORG-ID)%`,
    /// no early header mutation.
    fn plain_access_log(upstream_port: u16) -> String {
        let text = std::fs::read_to_string(common::repo_root().join("envoy/recipes/access-log.yaml")).unwrap();
        let mut config = yaml_documents(&substitute_recipe(&text, upstream_port).unwrap()).unwrap().remove(0);
        let hcm = &mut config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
        assert!(hcm.as_object_mut().unwrap().remove("early_header_mutation_extensions").is_some());
        let format = &mut hcm["access_log"][0]["typed_config"]["log_format"]["json_format"];
        assert!(format["key_id"].as_str().unwrap().starts_with("%CEL("), "{format}");
        format["key_id"] = json!("%REQ(X-API-KEY-ID)%");
        format["org"] = json!("%REQ(X-ORG-ID)%");
        config.to_string()
    }

    #[test]
    fn keygate_removes_a_forged_identity_from_a_refused_request_before_envoy_logs_it() {
        let upstream = Upstream::start();
        let envoy = Envoy::try_start_config_text(&plain_access_log(upstream.port()), "json", 1)
            .unwrap_or_else(|log| panic!("Envoy did not start:\n{}", common::envoy::tail(&log, 80)));
        let r = Recipe { upstream, envoy };
        let lines = exchange(&r);
        for p in ["http1", "http2"] {
            let accepted = format!("/v1/{p}/accepted");
            assert_eq!(logged(&lines, &accepted, "GET", 200), (&json!("acce5501"), &json!("org_acme")));
            for (path, method, status) in
                [("missing", "GET", 401), ("invalid", "GET", 401), ("revoked", "GET", 401), ("scope", "POST", 403)]
            {
                let path = format!("/v1/{p}/{path}");
                assert_eq!(logged(&lines, &path, method, status), (&Value::Null, &Value::Null), "{path}");
            }
            // What keygate never sees it cannot clean: why the recipe reads the headers only once a
            // route is chosen.
            let redirected = format!("/v1/{p}/a/b");
            assert_eq!(logged(&lines, &redirected, "GET", 307), (&json!("acce5502"), &json!("org_globex")));
        }
    }
}
