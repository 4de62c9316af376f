//! The `keygate` command-line tool, run as a process: a key made by `new` works in a real Envoy and
//! `revoke` makes it 401; `hash` agrees with `sha256sum`; `check` names the exact field of every
//! planted problem in one run; files are changed in place, atomically, and never left corrupt.

// Test code: a failed step is a panic, as in a #[test] function.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::keyset::KEYSET_DIR;
use common::scratch::Scratch;
use common::serve::KeygateServe as Serve;
use common::{get, Envoy, EnvoyOptions, KeySetServer, Proto, Upstream, KEYSET_CLUSTER, MANIFEST_PATH};
use keygate_core::keys::hash_key;
use keygate_core::plugin::Plugin;
use serde_json::Value;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The `keygate` binary (see [`common::keygate_binary`]).
static BIN: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(common::keygate_binary);

impl Scratch {
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn read(&self, name: &str) -> String {
        fs::read_to_string(self.path(name)).unwrap()
    }
}

#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// Runs `keygate ARGS` in `dir` with `stdin`.
fn keygate_in(dir: &Path, args: &[&str], stdin: &[u8]) -> Run {
    let mut child = Command::new(&*BIN)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

fn keygate(s: &Scratch, args: &[&str]) -> Run {
    keygate_in(&s.0, args, b"")
}

/// Runs a command that must succeed.
fn ok(s: &Scratch, args: &[&str]) -> Run {
    let run = keygate(s, args);
    assert_eq!(run.code, 0, "keygate {args:?}: {run:#?}");
    run
}

/// Runs a command that must fail with `code` and one line on standard error.
fn fails(s: &Scratch, args: &[&str], code: i32) -> String {
    let run = keygate(s, args);
    assert_eq!(run.code, code, "keygate {args:?}: {run:#?}");
    assert_eq!(run.stderr.lines().count(), 1, "keygate {args:?}: not one line: {run:#?}");
    assert!(run.stderr.starts_with("keygate"), "{run:#?}");
    run.stderr
}

/// The id in `sk_live_{id}_{secret}`.
fn id_of(key: &str) -> &str {
    key.split('_').nth(2).unwrap()
}

fn sha256_hex(text: &str) -> String {
    hex::encode(hash_key(text.as_bytes()))
}

/// `keygate new … --keys keys.json`; returns the key.
fn new_key(s: &Scratch, args: &[&str]) -> String {
    let mut all = vec!["new", "--keys", "keys.json"];
    all.extend_from_slice(args);
    let run = ok(s, &all);
    run.stdout.trim_end().to_string()
}

fn records(s: &Scratch) -> Vec<Value> {
    let text = s.read("keys.json");
    Plugin::from_json(text.as_bytes()).unwrap_or_else(|e| panic!("keys.json is not valid: {e}\n{text}"));
    let file: Value = serde_json::from_str(&text).unwrap();
    file["keys"].as_array().unwrap().clone()
}

fn assert_key_format(key: &str) {
    let secret = key.strip_prefix("sk_live_").unwrap_or_else(|| panic!("{key:?}"));
    let (id, secret) = secret.split_once('_').unwrap();
    let hex = |t: &str, n: usize| t.len() == n && t.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c));
    assert!(hex(id, 8) && hex(secret, 64), "{key:?}");
}

const ROUTES: &str = r#"{
  "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
  "routes": [
    {"path": "/healthz", "public": true},
    {"methods": ["GET"], "path": "/v1/venues/{venue_id}", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
  ],
  "unmatched": "deny",
  "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
}"#;

#[test]
fn key_made_by_new_is_accepted_by_the_filter_in_envoy_and_revoke_makes_it_401() {
    let s = Scratch::new("envoy");
    let key = new_key(&s, &["--org", "org_42", "--scope", "venues:read", "--attr", "venue=v_7", "--expires", "30d"]);
    assert_key_format(&key);
    let id = id_of(&key).to_string();
    s.write("routes.json", ROUTES);
    let config = ok(&s, &["config", "--keys", "keys.json", "--routes", "routes.json"]).stdout;

    let upstream = Upstream::start();
    let bearer = format!("Bearer {key}");
    {
        let envoy = Envoy::start(&EnvoyOptions::new(Some(&config), upstream.port()));
        for proto in Proto::ALL {
            upstream.clear();
            let reply = get(envoy.port(), proto, "/v1/venues/v_7", &[("authorization", &bearer)]);
            assert_eq!(reply.status, 200, "{proto:?}: {}", reply.body);
            let seen = upstream.single_request();
            assert_eq!(seen.header("x-api-key-id").as_deref(), Some(id.as_str()));
            assert_eq!(seen.header("x-org-id").as_deref(), Some("org_42"));
            assert_eq!(seen.header("x-venue-id").as_deref(), Some("v_7"));
            assert!(!seen.has_header("authorization"), "the key reached the upstream: {seen:#?}");

            upstream.clear();
            let reply = get(envoy.port(), proto, "/v1/venues/v_8", &[("x-api-key", &key)]);
            assert_eq!(reply.status, 403, "{proto:?}: {}", reply.body);
            assert!(upstream.requests().is_empty());
        }
    }

    let run = ok(&s, &["revoke", &id, "--keys", "keys.json"]);
    assert_eq!(run.stderr, format!("keygate: revoked key {id} in keys.json\n"));
    let config = ok(&s, &["config", "--keys", "keys.json", "--routes", "routes.json"]).stdout;
    let envoy = Envoy::start(&EnvoyOptions::new(Some(&config), upstream.port()));
    for proto in Proto::ALL {
        upstream.clear();
        let reply = get(envoy.port(), proto, "/v1/venues/v_7", &[("authorization", &bearer)]);
        assert_eq!(reply.status, 401, "{proto:?}: {}", reply.body);
        assert!(upstream.requests().is_empty(), "a revoked key reached the upstream");
    }
}

#[test]
fn config_envoy_puts_new_keys_into_a_shipped_envoy_file_that_runs() {
    let s = Scratch::new("config-envoy");
    let key = new_key(&s, &["--org", "org_seaty_1", "--scope", "read"]);
    let recipe = common::repo_root().join("envoy/recipes/seaty.yaml");
    let original = fs::read_to_string(&recipe).unwrap();
    let run = ok(&s, &["config", "--keys", "keys.json", "--envoy", recipe.to_str().unwrap()]);
    s.write("envoy.yaml", &run.stdout);
    // Only the configuration block changed: the lines before and after it are the recipe's.
    let head = original.split("value: |").next().unwrap();
    assert!(run.stdout.starts_with(head));
    let router = original.find("- name: envoy.filters.http.router").unwrap();
    assert!(run.stdout.ends_with(&original[router..]));
    // `check` names the line where the configuration's JSON starts: the one after `value: |`.
    let first_json_line = head.lines().count() + 1;
    assert_eq!(
        ok(&s, &["check", "--envoy", "envoy.yaml"]).stdout,
        format!("envoy.yaml:{first_json_line}: ok (1 key, 2 routes)\n")
    );

    let upstream = Upstream::start();
    let envoy = Envoy::start_config_file(s.path("envoy.yaml"), upstream.port());
    let reply = get(envoy.port(), Proto::Http1, "/v1/events", &[("authorization", &format!("Bearer {key}"))]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(upstream.single_request().header("x-api-key-id").as_deref(), Some(id_of(&key)));
    upstream.clear();
    // The recipe's own demo keys were replaced by keys.json.
    let demo = "sk_live_5ea70001_f5db4e891528f82401ca3b3760c8a7d254b9752971a624254d7aa2f8b304d056";
    let reply = get(envoy.port(), Proto::Http1, "/v1/events", &[("authorization", &format!("Bearer {demo}"))]);
    assert_eq!(reply.status, 401, "{}", reply.body);
    assert!(upstream.requests().is_empty());
}

#[test]
fn new_prints_only_the_key_on_stdout_and_its_record_without_secret_on_stderr() {
    let s = Scratch::new("new-stdout");
    let run = ok(
        &s,
        &[
            "new",
            "--org",
            "org_42",
            "--scope",
            "a:read",
            "--scope",
            "b:write",
            "--attr",
            "venue=v_7",
            "--name",
            "Till 3",
            "--expires",
            "2099-01-01T00:00:00Z",
        ],
    );
    assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
    let key = run.stdout.strip_suffix('\n').unwrap();
    assert_key_format(key);
    let secret = key.rsplit('_').next().unwrap();
    assert!(!run.stderr.contains(secret), "the secret is on stderr: {}", run.stderr);
    let record: Value = serde_json::from_str(&run.stderr).unwrap_or_else(|e| panic!("{e}: {}", run.stderr));
    let created = record["created_at"].as_str().unwrap().to_string();
    assert_is_now(&created);
    assert_eq!(
        record,
        serde_json::json!({"id": id_of(key), "hash": sha256_hex(key), "org": "org_42", "name": "Till 3",
            "scopes": ["a:read", "b:write"], "attributes": {"venue": "v_7"},
            "expires_at": "2099-01-01T00:00:00Z", "revoked": false,
            "created_at": created, "preview": format!("sk_live_{}_…{}", id_of(key), &secret[60..])})
    );
    assert!(!s.path("keys.json").exists());
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// `at` is an RFC 3339 UTC time in whole seconds, within a minute of now.
fn assert_is_now(at: &str) {
    let at_ms = keygate_core::time::parse_rfc3339(at).unwrap_or_else(|e| panic!("{at:?}: {e}"));
    assert!((at_ms - now_ms()).abs() < 60_000, "{at} is not now");
    assert!(at.ends_with('Z') && at.len() == 20, "{at}");
}

#[test]
fn new_writes_a_preview_that_holds_only_the_last_four_characters_of_the_secret() {
    let s = Scratch::new("new-preview");
    let key = new_key(&s, &["--org", "o", "--prefix", "pk_test_"]);
    let secret = key.rsplit('_').next().unwrap();
    let record = &records(&s)[0];
    assert_eq!(record["preview"], format!("pk_test_{}_…{}", id_of(&key), &secret[60..]));
    assert_is_now(record["created_at"].as_str().unwrap());
    // Any 8 characters of the secret would be more than its last four.
    let file = s.read("keys.json");
    for i in 0..=56 {
        assert!(!file.contains(&secret[i..i + 8]), "keys.json holds {:?} of the secret", &secret[i..i + 8]);
    }
}

#[test]
fn new_takes_a_default_expiry_from_keygate_expires_and_never_overrides_it() {
    let s = Scratch::new("new-default-expiry");
    let with_default = |args: &[&str]| {
        let out = Command::new(&*BIN).args(args).current_dir(&s.0).env("KEYGATE_EXPIRES", "365d").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    with_default(&["new", "--org", "o", "--keys", "keys.json"]);
    with_default(&["new", "--org", "o", "--keys", "keys.json", "--expires", "never"]);
    with_default(&["new", "--org", "o", "--keys", "keys.json", "--expires", "2d"]);
    new_key(&s, &["--org", "o"]);
    let all = records(&s);
    let expiry = |i: usize| all[i]["expires_at"].as_str().map(|t| keygate_core::time::parse_rfc3339(t).unwrap());
    let day = 86_400_000;
    assert!((expiry(0).unwrap() - now_ms() - 365 * day).abs() < 60_000, "{:?}", all[0]);
    assert_eq!(expiry(1), None);
    assert!((expiry(2).unwrap() - now_ms() - 2 * day).abs() < 60_000, "{:?}", all[2]);
    assert_eq!(expiry(3), None, "without KEYGATE_EXPIRES a key does not expire");
    let out = Command::new(&*BIN)
        .args(["new", "--org", "o"])
        .current_dir(&s.0)
        .env("KEYGATE_EXPIRES", "soon")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("(from KEYGATE_EXPIRES)"), "{out:?}");
    assert!(out.stdout.is_empty());
}

#[test]
fn new_keys_are_different_every_time() {
    let s = Scratch::new("new-random");
    let keys: Vec<String> = (0..5).map(|_| ok(&s, &["new", "--org", "o"]).stdout).collect();
    for (i, a) in keys.iter().enumerate() {
        for b in keys.iter().skip(i + 1) {
            assert_ne!(a, b);
            assert_ne!(id_of(a), id_of(b));
        }
    }
}

#[test]
fn new_expires_in_days_is_written_as_rfc3339_utc() {
    let s = Scratch::new("new-expires");
    new_key(&s, &["--org", "o", "--expires", "90d"]);
    let at = records(&s)[0]["expires_at"].as_str().unwrap().to_string();
    let at_ms = keygate_core::time::parse_rfc3339(&at).unwrap();
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let ninety_days = 90 * 86_400_000;
    assert!((at_ms - now_ms - ninety_days).abs() < 60_000, "{at}");
    assert!(at.ends_with('Z') && at.len() == 20, "{at}");
    let err = fails(&s, &["new", "--org", "o", "--expires", "2020-01-01T00:00:00Z"], 2);
    assert!(err.contains("--expires"), "{err}");
    fails(&s, &["new", "--org", "o", "--expires", "soon"], 2);
}

#[test]
fn new_with_keys_creates_the_file_and_refuses_a_duplicate_id() {
    let s = Scratch::new("new-dup");
    let key = new_key(&s, &["--org", "org_1", "--id", "0000abcd"]);
    assert_eq!(id_of(&key), "0000abcd");
    let before = s.read("keys.json");
    assert_eq!(records(&s).len(), 1);
    assert_eq!(records(&s)[0]["hash"], sha256_hex(&key));
    let err = fails(&s, &["new", "--org", "org_2", "--id", "0000ABCD", "--keys", "keys.json"], 1);
    assert_eq!(err, "keygate: keys.json: already has a key with id 0000abcd\n");
    assert_eq!(s.read("keys.json"), before, "a refused new changed the file");
}

#[test]
fn new_and_revoke_keep_every_other_byte_of_the_file() {
    let s = Scratch::new("bytes");
    let hash = "A".repeat(64);
    // Hand-written: its own spacing, an escaped name, an integer expiry, a record over three lines.
    let original = format!(
        "{{ \"keys\" :[\n\t{{\"id\":\"legacy1\",\"hash\":\"{hash}\",\"org\":\"caf\\u00e9\",\"expires_at\":4102444800}} ,\n\t{{\"id\": \"legacy2\",\n\t  \"hash\": \"{}\",\n\t  \"org\": \"o\"}}\n ]  }}\n",
        "b".repeat(64)
    );
    s.write("keys.json", &original);

    let key = new_key(&s, &["--org", "org_9"]);
    let after_new = s.read("keys.json");
    let cut = original.rfind("}\n ]").unwrap() + 1;
    assert!(after_new.starts_with(&original[..cut]), "{after_new}");
    assert!(after_new.ends_with(&original[cut..]), "{after_new}");
    let inserted = &after_new[cut..after_new.len() - (original.len() - cut)];
    assert!(inserted.starts_with(",\n\t{\"id\": \""), "{inserted:?}");
    assert!(inserted.contains(&sha256_hex(&key)), "{inserted:?}");

    ok(&s, &["revoke", "legacy2", "--keys", "keys.json"]);
    let after_revoke = s.read("keys.json");
    let want = after_new.replacen("\"org\": \"o\"}", "\"org\": \"o\",\n\t  \"revoked\": true}", 1);
    assert_eq!(after_revoke, want);

    ok(&s, &["revoke", id_of(&key), "legacy1", "--keys", "keys.json"]);
    let all = records(&s);
    assert!(all.iter().all(|r| r["revoked"] == true), "{all:#?}");
    assert_eq!(all[0]["expires_at"], 4102444800u64);
    assert_eq!(all[0]["org"], "café");
}

#[test]
fn revoke_of_an_unknown_id_changes_nothing() {
    let s = Scratch::new("revoke-unknown");
    new_key(&s, &["--org", "o", "--id", "00000001"]);
    let before = s.read("keys.json");
    let err = fails(&s, &["revoke", "00000001", "ffffffff", "--keys", "keys.json"], 1);
    assert_eq!(err, "keygate: keys.json: no key with id \"ffffffff\"; nothing was changed\n");
    assert_eq!(s.read("keys.json"), before);
    ok(&s, &["revoke", "00000001", "--keys", "keys.json"]);
    let run = ok(&s, &["revoke", "00000001", "--keys", "keys.json"]);
    assert_eq!(run.stderr, "keygate: key 00000001 in keys.json was already revoked\n");
}

#[test]
fn list_shows_the_public_part_expiry_and_status_of_every_key() {
    let s = Scratch::new("list");
    s.write(
        "keys.json",
        &format!(
            r#"{{"keys": [
  {{"id": "aaaa0001", "hash": "{}", "org": "org_1", "name": "Till 1", "scopes": ["a", "b"], "expires_at": "2099-01-01T01:00:00+01:00"}},
  {{"id": "aaaa0002", "hash": "{}", "org": "org_2", "revoked": true}},
  {{"id": "aaaa0003", "hash": "{}", "org": "org_3", "expires_at": 1577836800}}
]}}"#,
            "1".repeat(64),
            "2".repeat(64),
            "3".repeat(64)
        ),
    );
    let run = ok(&s, &["list", "--keys", "keys.json"]);
    let want = "\
ID        NAME    PREVIEW             ORG    SCOPES  CREATED  EXPIRES               LAST USED  REQUESTS  STATUS
aaaa0001  Till 1  sk_live_aaaa0001_…  org_1  a b     -        2099-01-01T00:00:00Z  -          -         active
aaaa0002  -       sk_live_aaaa0002_…  org_2  -       -        never                 -          -         revoked
aaaa0003  -       sk_live_aaaa0003_…  org_3  -       -        2020-01-01T00:00:00Z  -          -         expired
";
    assert_eq!(run.stdout, want);
    let run = ok(&s, &["list", "--keys", "keys.json", "--prefix", "pk_"]);
    assert!(run.stdout.contains("pk_aaaa0001_…"), "{}", run.stdout);
    for forbidden in ["1".repeat(64), "2".repeat(64)] {
        assert!(!run.stdout.contains(&forbidden), "list shows a hash");
    }
}

#[test]
fn hash_matches_sha256sum() {
    let s = Scratch::new("hash");
    let key = "sk_live_0000abcd_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
    let mut sha = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    sha.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
    let sum = String::from_utf8(sha.wait_with_output().unwrap().stdout).unwrap();
    let want = format!("{}\n", sum.split_whitespace().next().unwrap());
    for input in [key.to_string(), format!("{key}\n"), format!("{key}\r\n")] {
        let run = keygate_in(&s.0, &["hash"], input.as_bytes());
        assert_eq!((run.code, run.stdout.as_str(), run.stderr.as_str()), (0, want.as_str(), ""), "{input:?}");
    }
}

#[test]
fn hash_never_takes_or_echoes_a_key_from_the_command_line() {
    let s = Scratch::new("hash-argv");
    let key = "sk_live_0000abcd_secretsecret";
    let err = fails(&s, &["hash", key], 2);
    assert!(!err.contains("secretsecret"), "{err}");
    for bad in ["", "\n", "two keys\n", "k1\nk2\n"] {
        let run = keygate_in(&s.0, &["hash"], bad.as_bytes());
        assert_eq!(run.code, 1, "{bad:?}: {run:#?}");
        assert_eq!(run.stdout, "");
        assert!(!run.stderr.contains("keys") && !run.stderr.contains("k2"), "{run:#?}");
    }
}

const H0: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

#[test]
fn check_reports_the_exact_field_of_every_planted_error_in_one_run() {
    let s = Scratch::new("check");
    s.write(
        "config.json",
        &format!(
            r#"{{
  "credential": {{"headers": ["authorization", "x-api-key"]}},
  "keys": [
    {{"id": "k1", "hash": "{H0}", "org": "org_1"}},
    {{"id": "k2", "hash": "{}g", "org": "org_1"}},
    {{"id": "k1", "hash": "{H1}", "org": "org_1"}},
    {{"id": "k4", "hash": "{H2}", "org": "org_1", "team": "t_1"}},
    {{"id": "k5", "hash": "{H0}", "org": "org_1", "expires_at": "next year"}}
  ],
  "routes": [
    {{"path": "/v1/venues/{{venue_id}}", "bind": {{"venue": "venue"}}}},
    {{"methods": ["GET", "GE T"], "path": "/v1/x"}}
  ],
  "upstream": {{"key_id_header": "x-api-key"}},
  "errors": {{"forbidden": {{"message": "Go away, {{who}}", "status": 200}}}}
}}"#,
            &H0[..63]
        ),
    );
    let run = keygate(&s, &["check", "config.json"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(run.stderr, "");
    let want = r#"config.json: keys[1].hash: expected 64 hex characters (a SHA-256)
config.json: keys[2].id: duplicate id "k1" (also keys[0])
config.json: keys[3].team: unknown field `team`, expected one of `id`, `hash`, `org`, `name`, `scopes`, `attributes`, `expires_at`, `revoked`, `created_at`, `preview`
config.json: keys[4].hash: duplicate hash (also keys[0])
config.json: keys[4].expires_at: expected an RFC 3339 timestamp such as 2027-01-01T00:00:00Z, got "next year"
config.json: routes[0].bind.venue: the path "/v1/venues/{venue_id}" has no {venue}
config.json: routes[1].methods[1]: "GE T" is not an HTTP method
config.json: upstream.key_id_header: "x-api-key" is also a credential header
config.json: errors.forbidden.message: unknown placeholder {who} in "Go away, {who}"; known: {code}, {status}, {missing_scopes}, {request_id}
config.json: errors.forbidden.status: must be between 400 and 599
"#;
    assert_eq!(run.stdout, want);
}

#[test]
fn check_passes_a_clean_configuration_and_a_key_set_file() {
    let s = Scratch::new("check-ok");
    new_key(&s, &["--org", "o"]);
    new_key(&s, &["--org", "o"]);
    s.write("routes.json", ROUTES);
    let run = ok(&s, &["check", "keys.json", "routes.json"]);
    assert_eq!(run.stdout, "keys.json: ok (2 keys, 0 routes)\nroutes.json: ok (0 keys, 2 routes)\n");
    let config = ok(&s, &["config", "--keys", "keys.json", "--routes", "routes.json"]).stdout;
    let run = keygate_in(&s.0, &["check", "-"], config.as_bytes());
    assert_eq!((run.code, run.stdout.as_str()), (0, "-: ok (2 keys, 2 routes)\n"));
}

#[test]
fn check_reports_bad_json_once_with_its_position() {
    let s = Scratch::new("check-syntax");
    s.write("broken.json", "{\n  \"keys\": [\n    {\"id\": \"a\",}\n  ]\n}\n");
    let run = keygate(&s, &["check", "broken.json"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.stdout, "broken.json: keys[0]: trailing comma at line 3 column 16\n");
}

#[test]
fn check_envoy_passes_every_shipped_envoy_file() {
    let root = common::repo_root();
    let mut files = vec![root.join("envoy/envoy.yaml"), root.join("envoy/live/envoy.yaml")];
    let mut recipes: Vec<PathBuf> = fs::read_dir(root.join("envoy/recipes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    recipes.sort();
    assert!(!recipes.is_empty());
    files.extend(recipes);
    let mut args = vec!["check".to_string(), "--envoy".to_string()];
    args.extend(files.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = keygate_in(&root, &args, b"");
    assert_eq!(run.code, 0, "{run:#?}");
    assert_eq!(run.stdout.lines().count(), files.len(), "{}", run.stdout);
    assert!(run.stdout.lines().all(|l| l.contains(": ok (")), "{}", run.stdout);
}

#[test]
fn check_envoy_reports_planted_errors_at_their_line() {
    let s = Scratch::new("check-envoy");
    let shipped = fs::read_to_string(common::repo_root().join("envoy/envoy.yaml")).unwrap();
    let good_hash = "605b02e9dbd0a8142f75b1ea54b8956285053d51ad4528113dad82318d932f1b";
    assert!(shipped.contains(good_hash) && shipped.contains(r#""unmatched": "deny""#));
    let bad = shipped.replace(good_hash, "605b02e9").replace(r#""unmatched": "deny""#, r#""unmatched": "never""#);
    s.write("envoy.yaml", &bad);
    let line_of = |needle: &str| bad.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let run = keygate(&s, &["check", "--envoy", "envoy.yaml"]);
    assert_eq!(run.code, 1, "{run:#?}");
    let want = format!(
        "envoy.yaml:{}: keys[0].hash: expected 64 hex characters (a SHA-256), got 8\n\
         envoy.yaml:{}: unmatched: unknown variant `never`, expected `authenticate` or `deny`\n",
        line_of("\"hash\": \"605b02e9\""),
        line_of("\"unmatched\": \"never\"")
    );
    assert_eq!(run.stdout, want);

    s.write("plain.yaml", "static_resources: {}\n");
    let run = keygate(&s, &["check", "--envoy", "plain.yaml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with("plain.yaml: no keygate filter found"), "{run:#?}");
    s.write("broken.yaml", "static_resources:\n  listeners: [\n");
    let run = keygate(&s, &["check", "--envoy", "broken.yaml"]);
    assert_eq!(run.code, 1);
    assert!(run.stdout.starts_with("broken.yaml:3: not valid YAML"), "{run:#?}");
}

#[test]
fn check_envoy_reads_an_istio_wasm_plugin() {
    let s = Scratch::new("check-istio");
    let plugin = format!(
        "\
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata:
  name: keygate
spec:
  url: oci://registry.example/keygate:0.1.0
  pluginConfig:
    credential:
      prefixes: [sk_live_]
    keys:
    - id: k1
      hash: '{H0}'
      org: org_1
    - id: k2
      hash: \"{H1}\"
      org: org_1
      scopes: [read]
    errors:
      forbidden: {{status: 403}}
"
    );
    s.write("plugin.yaml", &plugin);
    let run = keygate(&s, &["check", "--envoy", "plugin.yaml"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "plugin.yaml:8: ok (2 keys, 0 routes)\n"), "{run:#?}");
    let bad = plugin
        .replace("org: org_1\n    - id: k2", "org: org_1\n      colour: red\n    - id: k2")
        .replace("scopes: [read]", "scopes: [read, 7]");
    s.write("bad.yaml", &bad);
    let run = keygate(&s, &["check", "--envoy", "bad.yaml"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert_eq!(
        run.stdout,
        "bad.yaml:14: keys[0].colour: unknown field `colour`, expected one of `id`, `hash`, `org`, `name`, \
         `scopes`, `attributes`, `expires_at`, `revoked`, `created_at`, `preview`\n\
         bad.yaml:18: keys[1].scopes[1]: invalid type: integer `7`, expected a string\n"
    );
}

#[test]
fn config_prints_a_configuration_the_filter_accepts() {
    let s = Scratch::new("config");
    let key = new_key(&s, &["--org", "org_1", "--scope", "venues:read"]);
    s.write("routes.json", ROUTES);
    let out = ok(&s, &["config", "--keys", "keys.json", "--routes", "routes.json"]).stdout;
    let policy = Plugin::from_json(out.as_bytes()).unwrap().policy;
    assert_eq!((policy.keys.len(), policy.routes.len()), (1, 2));
    let value: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(value["keys"][0]["hash"], sha256_hex(&key));
    assert_eq!(value["unmatched"], "deny");
    let order: Vec<usize> = ["\"credential\"", "\"keys\"", "\"routes\"", "\"unmatched\"", "\"upstream\""]
        .iter()
        .map(|f| out.find(f).unwrap())
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{out}");

    let only_keys = ok(&s, &["config", "--keys", "keys.json"]).stdout;
    assert_eq!(Plugin::from_json(only_keys.as_bytes()).unwrap().policy.keys.len(), 1);

    s.write("with-keys.json", r#"{"keys": [], "routes": []}"#);
    let err = fails(&s, &["config", "--keys", "keys.json", "--routes", "with-keys.json"], 1);
    assert!(err.contains("with-keys.json: keys: "), "{err}");
    s.write("bad-routes.json", r#"{"routes": [{"path": "no-slash"}]}"#);
    let err = fails(&s, &["config", "--keys", "keys.json", "--routes", "bad-routes.json"], 1);
    assert!(err.starts_with("keygate: bad-routes.json: routes[0].path: "), "{err}");
    let err = fails(&s, &["config", "--keys", "keys.json", "--shards", "out", "--routes", "routes.json"], 2);
    assert!(err.contains("--shards writes only the key set"), "{err}");
    assert!(!s.path("out").exists());
}

/// Serves what `keygate config --shards` wrote in `dir` from the key-set server, as published.
fn serve(server: &KeySetServer, dir: &Path) {
    let manifest = fs::read(dir.join("manifest.json")).unwrap();
    let listed: Value = serde_json::from_slice(&manifest).unwrap();
    for shard in listed["shards"].as_array().unwrap() {
        let path = shard["path"].as_str().unwrap();
        server.put(&format!("{KEYSET_DIR}{path}"), fs::read(dir.join(path)).unwrap());
    }
    server.put(MANIFEST_PATH, manifest);
}

/// Polls until `GET /v1/x` with `key` answers `status`; panics after `within`.
fn wait_for_status(envoy: &Envoy, key: &str, status: u16, within: Duration) {
    let until = std::time::Instant::now() + within;
    let bearer = format!("Bearer {key}");
    loop {
        let reply = get(envoy.port(), Proto::Http1, "/v1/x", &[("authorization", &bearer)]);
        if reply.status == status {
            return;
        }
        assert!(std::time::Instant::now() < until, "still {} after {within:?}: {}", reply.status, reply.body);
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn config_shards_publishes_a_key_set_the_filter_loads_and_a_revocation_reaches_it() {
    let s = Scratch::new("shards");
    let key = new_key(&s, &["--org", "org_1"]);
    let other = new_key(&s, &["--org", "org_2"]);
    let run = ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "1"]);
    assert_eq!(run.stdout, "");
    assert_eq!(
        run.stderr,
        format!(
            "keygate: wrote {} (version 1) and 16 shards holding 2 keys\n",
            Path::new("out").join("manifest.json").display()
        )
    );

    let server = KeySetServer::start();
    serve(&server, &s.path("out"));
    let upstream = Upstream::start();
    let config = format!(
        r#"{{"credential": {{"prefixes": ["sk_live_"]}},
            "key_set": {{"cluster": "{KEYSET_CLUSTER}", "path": "{MANIFEST_PATH}", "poll_interval_ms": 300, "timeout_ms": 300}}}}"#
    );
    let mut opts = EnvoyOptions::new(Some(&config), upstream.port());
    opts.keyset_port = Some(server.port());
    let envoy = Envoy::start(&opts);
    wait_for_status(&envoy, &key, 200, Duration::from_secs(10));
    assert_eq!(upstream.requests().last().unwrap().header("x-api-key-id").as_deref(), Some(id_of(&key)));

    ok(&s, &["revoke", id_of(&key), "--keys", "keys.json"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "2"]);
    serve(&server, &s.path("out"));
    wait_for_status(&envoy, &key, 401, Duration::from_secs(10));
    wait_for_status(&envoy, &other, 200, Duration::from_secs(1));
}

/// What `dir` publishes: the manifest's version, and each key's id and whether it is revoked, as
/// the filter's manifest and shard checks read them, in shard order.
fn published(dir: &Path) -> (String, usize, Vec<(String, bool)>) {
    let manifest = keygate_core::live::parse_manifest(&fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut keys = Vec::new();
    for shard in &manifest.shards {
        let body = fs::read(dir.join(&shard.path)).unwrap();
        for (_, key) in keygate_core::live::parse_shard(shard, &body).unwrap() {
            keys.push((key.id, key.revoked));
        }
    }
    (manifest.version, manifest.shards.len(), keys)
}

/// The shard files of `dir`, by name, as bytes.
fn shard_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = fs::read_dir(dir.join("shards"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

#[test]
fn new_rotate_and_revoke_with_shards_republish_the_key_set_in_the_width_it_has_with_a_rising_version() {
    let s = Scratch::new("edit-shards");
    let a = new_key(&s, &["--org", "org_1"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--digits", "0", "--manifest-version", "1"]);
    let manifest = Path::new("out").join("manifest.json").display().to_string();

    let run = ok(&s, &["revoke", id_of(&a), "--keys", "keys.json", "--shards", "out"]);
    let (version, shards, keys) = published(&s.path("out"));
    assert_eq!(
        run.stderr,
        format!(
            "keygate: revoked key {} in keys.json\nkeygate: wrote {manifest} (version {version}) and 1 shard holding 1 key\n",
            id_of(&a)
        )
    );
    assert_eq!((shards, keys), (1, vec![(id_of(&a).to_string(), true)]), "one shard, as published before");
    let first: u64 = version.parse().unwrap();
    assert!(first.abs_diff(now_ms() as u64 / 1000) < 60, "{version}");

    let run = ok(&s, &["new", "--org", "org_2", "--keys", "keys.json", "--shards", "out"]);
    let b = run.stdout.trim_end().to_string();
    assert_key_format(&b);
    assert_eq!(run.stderr.lines().count(), 2, "{run:#?}");
    let (version, _, keys) = published(&s.path("out"));
    assert!(version.parse::<u64>().unwrap() > first, "{version} after {first}: a new version each time");
    assert_eq!(keys.len(), 2);
    assert!(keys.contains(&(id_of(&b).to_string(), false)));

    let run = ok(&s, &["rotate", id_of(&b), "--keys", "keys.json", "--shards", "out"]);
    let c = run.stdout.trim_end().to_string();
    let (_, shards, mut keys) = published(&s.path("out"));
    keys.sort();
    let mut want = vec![(id_of(&a).to_string(), true), (id_of(&b).to_string(), true), (id_of(&c).to_string(), false)];
    want.sort();
    assert_eq!((shards, keys), (1, want));
    // Byte for byte what `keygate config --shards` publishes from the same file.
    ok(&s, &["config", "--keys", "keys.json", "--shards", "again", "--digits", "0"]);
    assert_eq!(shard_files(&s.path("out")), shard_files(&s.path("again")));

    // Every key named already revoked: nothing to change, and the directory is published all the same.
    fs::remove_dir_all(s.path("out")).unwrap();
    let before = s.read("keys.json");
    let run = ok(&s, &["revoke", id_of(&a), "--keys", "keys.json", "--shards", "out"]);
    assert!(run.stderr.starts_with(&format!("keygate: key {} in keys.json was already revoked\n", id_of(&a))));
    assert_eq!(s.read("keys.json"), before);
    assert_eq!(published(&s.path("out")).1, 16, "a directory with no manifest gets 16 shards");
}

#[test]
fn an_edit_whose_republication_fails_keeps_the_change_and_says_how_to_publish_it() {
    let s = Scratch::new("edit-shards-fail");
    let a = new_key(&s, &["--org", "org_1"]);
    s.write("blocker", "not a directory");
    let run = keygate(&s, &["revoke", id_of(&a), "--keys", "keys.json", "--shards", "blocker"]);
    assert_eq!(run.code, 1, "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines[0], format!("keygate: revoked key {} in keys.json", id_of(&a)));
    assert!(
        lines[1].starts_with(&format!("keygate: {}: cannot create: ", Path::new("blocker").join("shards").display()))
            && lines[1].ends_with(
                ": keys.json is changed but not republished; `keygate config --keys keys.json --shards blocker` \
                 publishes it"
            ),
        "{run:#?}"
    );
    assert_eq!(lines.len(), 2, "{run:#?}");
    assert_eq!(records(&s)[0]["revoked"], true);

    // A key made while publishing fails is still printed, once: it is in the file.
    let run = keygate(&s, &["new", "--org", "org_2", "--keys", "keys.json", "--shards", "blocker"]);
    assert_eq!(run.code, 1, "{run:#?}");
    assert_key_format(run.stdout.trim_end());
    assert_eq!(records(&s).len(), 2);

    assert_eq!(
        fails(&s, &["new", "--org", "o", "--shards", "out"], 2),
        "keygate new: --shards goes with --keys: it publishes that file (see keygate new --help)\n"
    );
    assert!(!s.path("out").exists());
}

#[test]
fn concurrent_new_from_many_processes_all_land() {
    let s = Scratch::new("concurrent");
    new_key(&s, &["--org", "first"]);
    let children: Vec<_> = (0..12)
        .map(|i| {
            Command::new(&*BIN)
                .args(["new", "--org", &format!("org_{i}"), "--keys", "keys.json"])
                .current_dir(&s.0)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let keys: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            String::from_utf8(out.stdout).unwrap().trim_end().to_string()
        })
        .collect();
    let all = records(&s);
    assert_eq!(all.len(), 13);
    for key in &keys {
        let hash = sha256_hex(key);
        assert_eq!(all.iter().filter(|r| r["hash"] == hash.as_str()).count(), 1, "{key} is not in keys.json once");
    }
    ok(&s, &["check", "keys.json"]);
}

#[test]
fn a_corrupt_key_set_file_is_refused_and_never_overwritten() {
    let s = Scratch::new("corrupt");
    new_key(&s, &["--org", "o", "--id", "0000aaaa"]);
    let good = s.read("keys.json");
    let cases = [
        ("truncated", good[..good.len() / 2].to_string()),
        ("empty", String::new()),
        ("bad record", good.replace("\"org\": \"o\"", "\"org\": \" o\"")),
        ("not a key set", r#"{"keys": [], "routes": []}"#.to_string()),
    ];
    for (what, text) in cases {
        s.write("keys.json", &text);
        for args in
            [&["new", "--org", "o", "--keys", "keys.json"][..], &["revoke", "0000aaaa", "--keys", "keys.json"][..]]
        {
            let run = keygate(&s, args);
            assert_eq!(run.code, 1, "{what}: {run:#?}");
            assert_eq!(run.stdout, "", "{what}: a key was printed for a record that was not stored");
            assert_eq!(run.stderr.lines().count(), 1, "{what}: {run:#?}");
            assert!(run.stderr.starts_with("keygate: keys.json: "), "{what}: {run:#?}");
            assert_eq!(s.read("keys.json"), text, "{what}: the file was changed");
        }
    }
}

#[test]
fn a_leftover_temporary_file_does_not_end_up_in_the_key_set() {
    let s = Scratch::new("leftover");
    new_key(&s, &["--org", "o"]);
    s.write("keys.json.keygate-tmp", "{\"keys\": [garbage");
    new_key(&s, &["--org", "o"]);
    assert_eq!(records(&s).len(), 2);
    assert!(!s.path("keys.json.keygate-tmp").exists());
}

#[test]
fn a_writer_killed_at_any_moment_never_leaves_a_corrupt_file() {
    let s = Scratch::new("killed");
    new_key(&s, &["--org", "o"]);
    let mut count = 1;
    for i in 0..40u64 {
        let mut child = Command::new(&*BIN)
            .args(["new", "--org", "o", "--keys", "keys.json"])
            .current_dir(&s.0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_micros(i * 150));
        let _ = child.kill();
        let _ = child.wait();
        let now = records(&s).len();
        assert!(now == count || now == count + 1, "{count} records became {now}");
        count = now;
    }
    new_key(&s, &["--org", "o"]);
    assert_eq!(records(&s).len(), count + 1);
}

#[test]
fn every_command_has_help() {
    let s = Scratch::new("help");
    let main = ok(&s, &["--help"]).stdout;
    for command in ["new", "rotate", "revoke", "list", "hash", "check", "config", "serve"] {
        assert!(main.contains(&format!("  {command} ")), "{command} missing from keygate --help");
        let run = ok(&s, &[command, "--help"]);
        assert!(run.stdout.starts_with("Usage: keygate "), "{command}: {}", run.stdout);
        assert_eq!(ok(&s, &["help", command]).stdout, run.stdout);
    }
    assert!(ok(&s, &["new", "-h"]).stdout.contains("--org ORG"));
}

#[test]
fn errors_are_one_line_on_stderr_with_a_nonzero_exit() {
    let s = Scratch::new("errors");
    assert_eq!(
        fails(&s, &["frobnicate"], 2),
        "keygate: no command \"frobnicate\"; the commands are new, rotate, revoke, list, hash, check, config, serve (see keygate --help)\n"
    );
    assert_eq!(fails(&s, &["new"], 2), "keygate new: --org is required (see keygate new --help)\n");
    assert_eq!(
        fails(&s, &["new", "--org", "o", "--bogus"], 2),
        "keygate new: unknown option --bogus (see keygate new --help)\n"
    );
    assert_eq!(
        fails(&s, &["new", "--org", "o", "--scope", "two words"], 2),
        "keygate new: --scope: \"two words\" is not a scope (visible ASCII, no spaces) (see keygate new --help)\n"
    );
    assert_eq!(fails(&s, &["list", "--keys", "missing.json"], 1), "keygate: missing.json: no such file\n");
    assert_eq!(
        fails(&s, &["revoke", "--keys", "missing.json"], 2),
        "keygate revoke: name the ID of the key to revoke (see keygate revoke --help)\n"
    );
    let run = keygate(&s, &[]);
    assert_eq!(run.code, 2);
    assert!(run.stderr.contains("Usage: keygate"));
}

// ---- rotate -------------------------------------------------------------------------------------

#[test]
fn rotate_revokes_the_key_and_its_successor_works_in_envoy_with_the_same_identity() {
    let s = Scratch::new("rotate");
    let old = new_key(
        &s,
        &["--org", "org_42", "--scope", "venues:read", "--attr", "venue=v_7", "--name", "Till 3", "--expires", "30d"],
    );
    let other = new_key(&s, &["--org", "org_9"]);
    let run = ok(&s, &["rotate", id_of(&old), "--keys", "keys.json"]);
    assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
    let new = run.stdout.trim_end().to_string();
    assert_key_format(&new);
    let secret = new.rsplit('_').next().unwrap();
    assert!(!run.stderr.contains(secret), "{run:#?}");
    let new_id = id_of(&new);
    assert_eq!(
        run.stderr,
        format!(
            "keygate: revoked key {} and added its successor {new_id} (org org_42) to keys.json\n\
             keygate: key {} had an expiry and {new_id} has none (give --expires, or set KEYGATE_EXPIRES)\n",
            id_of(&old),
            id_of(&old)
        )
    );
    let all = records(&s);
    assert_eq!(all.len(), 3);
    assert_eq!(all[0]["revoked"], true);
    assert_eq!(all[1]["revoked"], false, "another key was touched: {all:#?}");
    let successor = &all[2];
    for field in ["org", "name", "scopes", "attributes"] {
        assert_eq!(successor[field], all[0][field], "{field}");
    }
    assert_eq!(successor["hash"], sha256_hex(&new));
    assert_eq!(successor["preview"], format!("sk_live_{new_id}_…{}", &secret[60..]));
    assert_eq!(successor.get("expires_at"), None);
    assert_is_now(successor["created_at"].as_str().unwrap());

    s.write("routes.json", ROUTES);
    let config = ok(&s, &["config", "--keys", "keys.json", "--routes", "routes.json"]).stdout;
    let upstream = Upstream::start();
    let envoy = Envoy::start(&EnvoyOptions::new(Some(&config), upstream.port()));
    for proto in Proto::ALL {
        upstream.clear();
        let reply = get(envoy.port(), proto, "/v1/venues/v_7", &[("authorization", &format!("Bearer {old}"))]);
        assert_eq!(reply.status, 401, "{proto:?}: the rotated key still works: {}", reply.body);
        assert!(upstream.requests().is_empty());
        let reply = get(envoy.port(), proto, "/v1/venues/v_7", &[("authorization", &format!("Bearer {new}"))]);
        assert_eq!(reply.status, 200, "{proto:?}: {}", reply.body);
        let seen = upstream.single_request();
        assert_eq!(seen.header("x-api-key-id").as_deref(), Some(new_id));
        assert_eq!(seen.header("x-org-id").as_deref(), Some("org_42"));
        assert_eq!(seen.header("x-venue-id").as_deref(), Some("v_7"));
        upstream.clear();
        let reply = get(envoy.port(), proto, "/v1/venues/v_8", &[("x-api-key", &new)]);
        assert_eq!(reply.status, 403, "{proto:?}: the successor lost its binding: {}", reply.body);
        let reply = get(envoy.port(), proto, "/v1/venues/v_7", &[("x-api-key", &other)]);
        assert_eq!(reply.status, 403, "{proto:?}: {}", reply.body);
    }
}

#[test]
fn rotate_refuses_an_unknown_or_revoked_id_and_changes_nothing() {
    let s = Scratch::new("rotate-refused");
    new_key(&s, &["--org", "o", "--id", "0000000a"]);
    let before = s.read("keys.json");
    assert_eq!(
        fails(&s, &["rotate", "ffffffff", "--keys", "keys.json"], 1),
        "keygate: keys.json: no key with id \"ffffffff\"; nothing was changed\n"
    );
    ok(&s, &["revoke", "0000000a", "--keys", "keys.json"]);
    let revoked = s.read("keys.json");
    assert_ne!(revoked, before);
    let run = keygate(&s, &["rotate", "0000000a", "--keys", "keys.json"]);
    assert_eq!((run.code, run.stdout.as_str()), (1, ""), "{run:#?}");
    assert_eq!(
        run.stderr,
        "keygate: keys.json: key 0000000a is already revoked (rotated before?); `keygate new` makes a key with its \
         settings; nothing was changed\n"
    );
    assert_eq!(s.read("keys.json"), revoked);
    assert_eq!(
        fails(&s, &["rotate", "--keys", "keys.json"], 2),
        "keygate rotate: name the ID of the key to rotate (see keygate rotate --help)\n"
    );
}

#[test]
fn rotate_keeps_the_old_keys_prefix_and_takes_an_expiry() {
    let s = Scratch::new("rotate-prefix");
    let old = new_key(&s, &["--org", "o", "--prefix", "pk_test_"]);
    let new = ok(&s, &["rotate", id_of(&old), "--keys", "keys.json", "--expires", "90d"]).stdout;
    assert!(new.starts_with("pk_test_"), "{new}");
    let at = records(&s)[1]["expires_at"].as_str().unwrap().to_string();
    let at_ms = keygate_core::time::parse_rfc3339(&at).unwrap();
    assert!((at_ms - now_ms() - 90 * 86_400_000).abs() < 60_000, "{at}");
}

// ---- serve --------------------------------------------------------------------------------------

/// A usage report of the contract, for key `id`.
fn report(batch: &str, id: &str, allowed: u64, last_used: &str) -> String {
    format!(
        r#"{{"batch_id": "{batch}", "node": "envoy-1", "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:10Z",
            "keys": {{"{id}": {{"allowed": {allowed}, "denied": {{"insufficient_scope": 1}}, "last_used": "{last_used}"}}}},
            "unattributed": {{"missing_key": 3, "invalid_key": 5}}, "dropped": 0}}"#
    )
}

#[test]
fn serve_gives_each_file_a_strong_etag_answers_304_and_refuses_every_path_outside_the_key_set() {
    let s = Scratch::new("serve-files");
    new_key(&s, &["--org", "o"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "1"]);
    fs::write(s.path("secret.json"), "{}").unwrap();
    fs::write(s.path("out/.hidden"), "{}").unwrap();
    fs::write(s.path("out/manifest.json.keygate-tmp"), "{\"half").unwrap();
    let serve = Serve::start(&s.0, "out", "usage");

    let manifest = fs::read(s.path("out/manifest.json")).unwrap();
    let etag = format!("\"{}\"", hex::encode(hash_key(&manifest)));
    let reply = serve.get("/manifest.json", "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body.as_bytes(), manifest);
    assert_eq!(reply.header("etag"), Some(etag.as_str()));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let reply = serve.get("/manifest.json", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!((reply.status, reply.body.as_str(), reply.header("etag")), (304, "", Some(etag.as_str())));
    let reply = serve.get("/manifest.json", "If-None-Match: \"0000\"\r\n");
    assert_eq!(reply.status, 200);
    let reply = serve.get("/shards/0.json?x=1", "");
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.body.as_bytes(), fs::read(s.path("out/shards/0.json")).unwrap());

    for path in [
        "/",
        "/nope.json",
        "/shards",
        "/../secret.json",
        "/shards/../../secret.json",
        "/%2e%2e/secret.json",
        "/shards%2f..%2f..%2fsecret.json",
        "/..%5csecret.json",
        "/.hidden",
        "/manifest.json.keygate-tmp",
        "/manifest.json.lock",
        "//secret.json",
    ] {
        let reply = serve.get(path, "");
        assert_eq!(reply.status, 404, "{path}: {}", reply.body);
        assert_eq!(reply.body, "{\"error\":\"no such file in the key set\"}\n", "{path}");
    }
    let reply = common::raw_http1(
        serve.port,
        b"GET http://keys/../secret.json HTTP/1.1\r\nHost: keys\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(reply.status, 404);
    let reply =
        common::raw_http1(serve.port, b"DELETE /manifest.json HTTP/1.1\r\nHost: keys\r\nConnection: close\r\n\r\n");
    assert_eq!((reply.status, reply.header("allow")), (405, Some("GET, HEAD")));

    let (code, log) = serve.stop();
    assert_eq!(code, Some(0), "{log:#?}");
    let requests: Vec<&String> = log.iter().skip(1).filter(|l| l.contains(" GET ")).collect();
    assert_eq!(requests.len(), 4 + 12 + 1, "one line per request: {log:#?}");
    assert!(requests[1].ends_with(" ms") && requests[1].contains(" GET /manifest.json 304 0 bytes "), "{log:#?}");
    assert!(log.iter().all(|l| !l.contains("x=1")), "a query string was logged: {log:#?}");
}

#[test]
fn serve_reads_a_republished_key_set_at_once() {
    let s = Scratch::new("serve-republish");
    new_key(&s, &["--org", "o"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "1"]);
    let serve = Serve::start(&s.0, "out", "usage");
    let first = serve.get("/manifest.json", "");
    let etag = first.header("etag").unwrap().to_string();
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "2"]);
    let reply = serve.get("/manifest.json", &format!("If-None-Match: {etag}\r\n"));
    assert_eq!(reply.status, 200, "the republished manifest was not seen");
    assert_ne!(reply.header("etag"), Some(etag.as_str()));
    assert!(reply.body.contains("\"version\": \"2\""), "{}", reply.body);
}

#[test]
fn serve_keeps_each_report_once_across_a_restart_and_refuses_malformed_and_oversized_ones() {
    let s = Scratch::new("serve-usage");
    fs::create_dir_all(s.path("out")).unwrap();
    let serve = Serve::start(&s.0, "out", "usage");
    let one = report("n1-1", "ab12cd34", 12, "2026-12-03T14:00:09Z");
    let reply = serve.post_usage(&one);
    assert_eq!((reply.status, reply.body.as_str()), (200, "{\"accepted\":true}\n"));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let reply = serve.post_usage(&one);
    assert_eq!((reply.status, reply.body.as_str()), (200, "{\"accepted\":false,\"duplicate\":true}\n"));

    let reply = serve.post_usage("{\"batch_id\": 7}");
    assert_eq!(reply.status, 400);
    assert_eq!(
        reply.body,
        "{\"accepted\":false,\"error\":\"batch_id: invalid type: integer `7`, expected a string at line 1 column 14\"}\n"
    );
    let reply = serve.post_usage(&one.replace("\"dropped\": 0", "\"dropped\": 0, \"secret\": 1"));
    assert_eq!(reply.status, 400);
    assert!(reply.body.contains("secret: unknown field `secret`"), "{}", reply.body);
    let reply = common::raw_http1(
        serve.port,
        format!("POST /usage HTTP/1.1\r\nHost: keys\r\nContent-Length: {}\r\n\r\n{{", 8 * 1024 * 1024 + 1).as_bytes(),
    );
    assert_eq!(reply.status, 413);
    assert_eq!(reply.body, "{\"accepted\":false,\"error\":\"a report is at most 8388608 bytes\"}\n");
    let reply = common::raw_http1(serve.port, b"GET /usage HTTP/1.1\r\nHost: keys\r\nConnection: close\r\n\r\n");
    assert_eq!((reply.status, reply.header("allow")), (405, Some("POST")));
    let (code, log) = serve.stop();
    assert_eq!(code, Some(0));
    assert!(log.iter().all(|l| !l.contains("ab12cd34") && !l.contains("secret")), "a body was logged: {log:#?}");

    let stored = fs::read_to_string(s.path("usage/usage.jsonl")).unwrap();
    assert_eq!(stored.lines().count(), 1, "{stored}");
    let line: Value = serde_json::from_str(stored.lines().next().unwrap()).unwrap();
    assert_eq!(line, serde_json::from_str::<Value>(&one).unwrap());

    let serve = Serve::start(&s.0, "out", "usage");
    assert!(serve.log.lock().unwrap()[0].ends_with("(1 reports)"), "{:?}", serve.log.lock().unwrap());
    let reply = serve.post_usage(&one);
    assert_eq!(reply.body, "{\"accepted\":false,\"duplicate\":true}\n", "a restart forgot the batch");
    let reply = serve.post_usage(&report("n1-2", "ab12cd34", 1, "2026-12-03T14:00:19Z"));
    assert_eq!(reply.body, "{\"accepted\":true}\n");
    drop(serve);
    assert_eq!(fs::read_to_string(s.path("usage/usage.jsonl")).unwrap().lines().count(), 2);
}

#[test]
fn list_sums_requests_and_the_last_use_from_the_reports_serve_kept() {
    let s = Scratch::new("list-usage");
    s.write(
        "keys.json",
        &format!(
            r#"{{"keys": [
  {{"id": "aaaa0001", "hash": "{}", "org": "org_1", "name": "Till 1", "created_at": "2026-01-01T10:00:00+01:00", "preview": "sk_live_aaaa0001_…9f3a"}},
  {{"id": "aaaa0002", "hash": "{}", "org": "org_2", "revoked": true}}
]}}"#,
            "1".repeat(64),
            "2".repeat(64)
        ),
    );
    fs::create_dir_all(s.path("out")).unwrap();
    let serve = Serve::start(&s.0, "out", "usage");
    for body in [
        report("b1", "aaaa0001", 12, "2026-12-03T14:00:09Z"),
        report("b2", "aaaa0001", 100, "2026-12-03T12:00:00Z"),
        report("b1", "aaaa0001", 12, "2026-12-03T14:00:09Z"),
        report("b3", "ffff0000", 5, "2026-12-03T14:00:09Z"),
    ] {
        assert_eq!(serve.post_usage(&body).status, 200);
    }
    drop(serve);
    let want = "\
ID        NAME    PREVIEW                 ORG    SCOPES  CREATED               EXPIRES  LAST USED             REQUESTS  STATUS
aaaa0001  Till 1  sk_live_aaaa0001_…9f3a  org_1  -       2026-01-01T09:00:00Z  never    2026-12-03T14:00:09Z  114       active
aaaa0002  -       sk_live_aaaa0002_…      org_2  -       -                     never    never                 0         revoked
";
    assert_eq!(ok(&s, &["list", "--keys", "keys.json", "--usage", "usage"]).stdout, want);
    assert_eq!(ok(&s, &["list", "--keys", "keys.json", "--usage", "usage/usage.jsonl"]).stdout, want);
    s.write("bad.jsonl", "{\"batch_id\": \"x\"}\n");
    assert_eq!(
        fails(&s, &["list", "--keys", "keys.json", "--usage", "bad.jsonl"], 1),
        "keygate: bad.jsonl:1: not a usage report: missing field `node` at line 1 column 17\n"
    );
}

#[test]
fn envoy_loads_keys_from_keygate_serve_and_a_revocation_republished_with_the_cli_takes_effect() {
    let s = Scratch::new("serve-envoy");
    let key = new_key(&s, &["--org", "org_1"]);
    let other = new_key(&s, &["--org", "org_2"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "1"]);
    let serve = Serve::start(&s.0, "out", "usage");
    let upstream = Upstream::start();
    let config = format!(
        r#"{{"credential": {{"prefixes": ["sk_live_"]}},
            "key_set": {{"cluster": "{KEYSET_CLUSTER}", "path": "/manifest.json", "poll_interval_ms": 300, "timeout_ms": 300}}}}"#
    );
    let mut opts = EnvoyOptions::new(Some(&config), upstream.port());
    opts.keyset_port = Some(serve.port);
    let envoy = Envoy::start(&opts);
    wait_for_status(&envoy, &key, 200, Duration::from_secs(10));
    assert_eq!(upstream.requests().last().unwrap().header("x-api-key-id").as_deref(), Some(id_of(&key)));

    ok(&s, &["revoke", id_of(&key), "--keys", "keys.json"]);
    ok(&s, &["config", "--keys", "keys.json", "--shards", "out", "--manifest-version", "2"]);
    wait_for_status(&envoy, &key, 401, Duration::from_secs(10));
    wait_for_status(&envoy, &other, 200, Duration::from_secs(1));
    // A few more polls of the unchanged manifest.
    std::thread::sleep(Duration::from_millis(1000));
    drop(envoy);
    let (_, log) = serve.stop();
    // The filter polls conditionally: an unchanged manifest is answered 304.
    assert!(log.iter().any(|l| l.contains(" GET /manifest.json 304 ")), "{log:#?}");
    assert!(log.iter().any(|l| l.contains(" GET /shards/")), "{log:#?}");
}
