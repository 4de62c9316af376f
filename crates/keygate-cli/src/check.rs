//! `keygate check`: every problem of a plugin configuration, found by the filter's own code.
//!
//! One compile ([`Plugin::from_json`]) reports every problem of what it read. Reading stops at the
//! first problem of the text, though (a field of the wrong type, an unknown or missing field), so
//! after such a problem check takes the field at fault out of a copy of the configuration, or puts
//! a harmless placeholder in its place ([`neutralise`]), and reads again, until the copy reads
//! whole. Key records are read alone first, so that a large key set with many records that do not
//! read costs one pass over it, not one per problem. Every message is the filter's own; which
//! field to take out is told by the error's kind and field, never by its text.

mod neutralise;

use crate::envoy;
use crate::json;
use keygate_core::error::{ConfigError, ErrorKind};
use keygate_core::keys::record::RawKey;
use keygate_core::plugin::Plugin;
use neutralise::neutralise;
use serde::Deserialize;
use serde_json::{Map, Value};

/// What a valid configuration holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Summary {
    pub keys: usize,
    pub routes: usize,
}

/// More problems than this are not worth listing: fix these first.
const MAX_PROBLEMS: usize = 500;

/// Checks a plugin configuration; `Err` lists every problem found, in the order of the text.
pub fn check(text: &[u8]) -> Result<Summary, Vec<ConfigError>> {
    let errors = match Plugin::from_json(text) {
        Ok(plugin) => return Ok(Summary { keys: plugin.policy.keys.len(), routes: plugin.policy.routes.len() }),
        Err(errors) => errors,
    };
    // Bad JSON, or not an object: that one problem, at its line and column, is all there is to say.
    let value = match serde_json::from_slice(text) {
        Ok(v @ Value::Object(_)) if errors.first().kind != ErrorKind::Syntax => v,
        _ => return Err(vec![errors.into_first()]),
    };
    let read_whole = errors.first().position.is_none();
    let mut problems: Vec<ConfigError> = Vec::new();
    for e in errors {
        push_new(&mut problems, without_position(e));
    }
    // Unless reading stopped at a problem, the compile saw everything: its problems are all.
    if !read_whole {
        settle_everything(value, &mut problems);
    }
    // In the order of the text: the offset of each field (or of what exists of its path).
    let mut locator = json::Locator::new(text);
    problems.sort_by_cached_key(|p| locator.locate(&p.field).unwrap_or(0));
    if problems.len() >= MAX_PROBLEMS {
        problems.push(ConfigError::new("", format!("stopped after {MAX_PROBLEMS} problems; fix these first")));
    }
    Err(problems)
}

/// The problems of a configuration whose reading stopped at a problem: each key record that does
/// not read is settled alone (a record's problems do not depend on the rest), then the whole.
fn settle_everything(mut value: Value, problems: &mut Vec<ConfigError>) {
    let mut placeholders = 0u64;
    if let Some(Value::Array(records)) = value.get_mut("keys") {
        for (i, record) in records.iter_mut().enumerate() {
            if RawKey::deserialize(&*record).is_ok() {
                continue;
            }
            let mut alone = Map::new();
            alone.insert("keys".into(), Value::Array(vec![record.take()]));
            let mut alone = Value::Object(alone);
            for mut e in settle(&mut alone, &mut placeholders, MAX_PROBLEMS.saturating_sub(problems.len())) {
                if let Some(rest) = e.field.strip_prefix("keys[0]") {
                    e.field = format!("keys[{i}]{rest}");
                }
                push_new(problems, e);
            }
            if let Some(settled) = alone.pointer_mut("/keys/0") {
                *record = settled.take();
            }
        }
    }
    for e in settle(&mut value, &mut placeholders, MAX_PROBLEMS.saturating_sub(problems.len())) {
        push_new(problems, e);
    }
}

/// Reads `value` again and again, neutralising each reading error, until it reads whole (then
/// the compile's problems are all there is), a problem cannot be neutralised, or `limit` problems
/// are found; returns the problems.
fn settle(value: &mut Value, placeholders: &mut u64, limit: usize) -> Vec<ConfigError> {
    let mut found: Vec<ConfigError> = Vec::new();
    let mut neutralised: Vec<String> = Vec::new();
    let mut last: Option<ConfigError> = None;
    while found.len() < limit {
        let Ok(bytes) = serde_json::to_vec(value) else { break };
        let errors = match Plugin::from_json(&bytes) {
            Ok(_) => break,
            Err(errors) => errors,
        };
        // No position: problems of what was read, which was everything.
        if errors.first().position.is_none() {
            found.extend(errors);
            break;
        }
        let error = without_position(errors.into_first());
        // The same problem again: neutralising it did not work, so stop rather than loop.
        if last.as_ref() == Some(&error) {
            break;
        }
        // A required field taken out because it was wrong is now missing: not a problem of its own.
        if !neutralised.iter().any(|field| lacks(&error, field)) {
            found.push(error.clone());
        }
        neutralised.push(error.field.clone());
        if !neutralise(value, &error, placeholders) {
            break;
        }
        last = Some(error);
    }
    found
}

/// True if `error` is that the object at its field lacks the member whose path is `field`.
fn lacks(error: &ConfigError, field: &str) -> bool {
    let ErrorKind::Missing { name } = &error.kind else { return false };
    let member = if error.field.is_empty() {
        Some(field)
    } else {
        field.strip_prefix(error.field.as_str()).and_then(|rest| rest.strip_prefix('.'))
    };
    member == Some(name.as_str())
}

/// Without where reading stopped: the field says where the problem is, and for a copy check reads,
/// the position would be in the copy, not in the user's text.
fn without_position(mut e: ConfigError) -> ConfigError {
    e.position = None;
    e
}

fn push_new(problems: &mut Vec<ConfigError>, e: ConfigError) {
    if problems.len() < MAX_PROBLEMS && !problems.contains(&e) {
        problems.push(e);
    }
}

/// Checks one JSON file (`label` names it in the report); prints the report; true if clean.
pub fn report_json(label: &str, text: &[u8], out: &mut impl std::io::Write) -> std::io::Result<bool> {
    match check(text) {
        Ok(s) => {
            writeln!(out, "{label}: ok ({})", summary(&s))?;
            Ok(true)
        }
        Err(problems) => {
            for p in problems {
                writeln!(out, "{label}: {p}")?;
            }
            Ok(false)
        }
    }
}

/// Checks every keygate configuration in an Envoy file; prints `FILE:LINE: field: message` for each
/// problem (the line of the field within the file when the value is a literal block, else the
/// line of the value); true if all are clean.
pub fn report_envoy(label: &str, text: &[u8], out: &mut impl std::io::Write) -> std::io::Result<bool> {
    let Ok(text) = std::str::from_utf8(text) else {
        writeln!(out, "{label}: not UTF-8 text")?;
        return Ok(false);
    };
    let scan = match envoy::scan(text) {
        Ok(scan) => scan,
        Err((line, message)) => {
            writeln!(out, "{label}:{line}: {message}")?;
            return Ok(false);
        }
    };
    for line in &scan.discovered {
        writeln!(
            out,
            "{label}:{line}: keygate's configuration comes from config_discovery (ECDS): check the file or server that serves it"
        )?;
    }
    if scan.found.is_empty() && !scan.discovered.is_empty() {
        return Ok(true);
    }
    if scan.found.is_empty() {
        let others = match scan.other_wasm_filters {
            0 => String::new(),
            n => format!("; {n} other wasm filter(s) found"),
        };
        writeln!(
            out,
            "{label}: no keygate filter found (a wasm filter whose name, root_id, vm_id or code file names keygate){others}"
        )?;
        return Ok(false);
    }
    let mut clean = true;
    for found in &scan.found {
        let json = found.json.as_bytes();
        match check(json) {
            Ok(s) => writeln!(out, "{label}:{}: ok ({})", found.line, summary(&s))?,
            Err(problems) => {
                clean = false;
                for p in problems {
                    writeln!(out, "{label}:{}: {p}", found.line_of(&p.field))?;
                }
            }
        }
    }
    Ok(clean)
}

fn summary(s: &Summary) -> String {
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    format!("{}, {}", plural(s.keys, "key"), plural(s.routes, "route"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(text: &str) -> Vec<String> {
        check(text.as_bytes()).unwrap_err().iter().map(|p| p.to_string()).collect()
    }

    const H: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    const H2: &str = "1111111111111111111111111111111111111111111111111111111111111111";

    #[test]
    fn a_valid_configuration_is_summarised() {
        let text = format!(r#"{{"keys": [{{"id": "a", "hash": "{H}", "org": "o"}}], "routes": [{{"path": "/x"}}]}}"#);
        assert_eq!(check(text.as_bytes()), Ok(Summary { keys: 1, routes: 1 }));
    }

    #[test]
    fn every_problem_is_reported_in_text_order() {
        let text = format!(
            r#"{{
  "credential": {{"headers": ["authorization", "bad header"]}},
  "keys": [
    {{"id": "a", "hash": "{H}", "org": "o"}},
    {{"id": "b", "hash": "abc", "org": " o", "colour": "red"}},
    {{"id": "a", "hash": "{H2}", "org": "o", "scopes": ["x", "bad scope"]}},
    {{"id": "c", "hash": "{H}"}},
    7
  ],
  "routes": [{{"path": "/v1/{{id}}", "bind": {{"nope": "venue"}}}}, {{"methods": [], "path": "x"}}],
  "unmatched": "sometimes",
  "upstream": {{"org_header": "authorization"}},
  "errors": {{"invalid_key": {{"status": 700}}, "forbidden": {{"message": "{{nope}}"}}}}
}}"#
        );
        let got = fields(&text);
        let want = [
            "credential.headers[1]: \"bad header\" is not a valid header name",
            "keys[1].hash: expected 64 hex characters (a SHA-256), got 3",
            "keys[1].org: must be non-empty, without control characters or surrounding spaces",
            "keys[1].colour: unknown field `colour`, expected one of `id`, `hash`, `org`, `name`, `scopes`, `attributes`, `expires_at`, `revoked`, `created_at`, `preview`",
            "keys[2].id: duplicate id \"a\" (also keys[0])",
            "keys[2].scopes[1]: \"bad scope\" is not a scope (visible ASCII, no spaces)",
            "keys[3]: missing field `org`",
            "keys[3].hash: duplicate hash (also keys[0])",
            "keys[4]: invalid type: integer `7`, expected struct RawKey",
            "routes[0].bind.nope: the path \"/v1/{id}\" has no {nope}",
            "routes[1].methods: must list a method, or be left out",
            "unmatched: unknown variant `sometimes`, expected `authenticate` or `deny`",
            "upstream.org_header: \"authorization\" is also a credential header",
            "errors.invalid_key.status: must be between 400 and 599",
        ];
        for w in want {
            assert!(got.iter().any(|g| g == w), "missing {w:?} in {got:#?}");
        }
        assert!(got.iter().any(|g| g.starts_with("routes[1].path: ")), "{got:#?}");
        assert!(got.iter().any(|g| g.starts_with("errors.forbidden.message: ")), "{got:#?}");
        assert_eq!(got.len(), want.len() + 2, "{got:#?}");
        let order: Vec<&str> = got.iter().map(|g| g.split(':').next().unwrap()).collect();
        assert_eq!(order.first(), Some(&"credential.headers[1]"));
        assert_eq!(order.last(), Some(&"errors.forbidden.message"), "{got:#?}");
    }

    #[test]
    fn a_syntax_error_is_one_problem_with_its_position() {
        assert_eq!(fields("{\n  \"keys\": [\n}"), ["keys[0]: expected value at line 3 column 1"]);
        assert_eq!(fields("{\"keys\": []"), ["EOF while parsing an object at line 1 column 11"]);
        assert_eq!(fields("[]"), ["expected a JSON object"]);
        assert_eq!(fields(" "), ["configuration is empty; expected a JSON object"]);
    }

    #[test]
    fn a_duplicate_member_is_reported_with_the_rest() {
        let got = fields(r#"{"keys": [], "keys": [], "unmatched": "x"}"#);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].starts_with("duplicate field `keys`"), "{got:#?}");
    }

    #[test]
    fn duplicates_name_the_first_record_of_their_id_or_hash() {
        let text = format!(
            r#"{{"keys": [{{"id": "a", "hash": "{H}", "org": "o"}}, {{"id": "b", "hash": "{H2}", "org": "o"}},
                {{"id": "b", "hash": "{H}", "org": "o"}}, {{"id": "a", "hash": "{H2}", "org": "o"}}]}}"#
        );
        assert_eq!(
            fields(&text),
            [
                "keys[2].id: duplicate id \"b\" (also keys[1])",
                "keys[2].hash: duplicate hash (also keys[0])",
                "keys[3].id: duplicate id \"a\" (also keys[0])",
                "keys[3].hash: duplicate hash (also keys[1])",
            ]
        );
    }

    #[test]
    fn a_required_field_that_is_wrong_is_not_also_reported_missing() {
        let got = fields(r#"{"key_set": {"cluster": 7, "path": "/m.json", "colour": 1}, "unmatched": "x"}"#);
        assert_eq!(got.len(), 3, "{got:#?}");
        assert!(got.iter().any(|g| g.starts_with("key_set.cluster: invalid type: integer `7`")), "{got:#?}");
        assert!(got.iter().any(|g| g.starts_with("key_set.colour: unknown field")), "{got:#?}");
        assert!(got.iter().any(|g| g.starts_with("unmatched: ")), "{got:#?}");
        let got = fields(r#"{"key_set": {"path": "/m.json"}, "unmatched": "x"}"#);
        assert_eq!(got.len(), 2, "{got:#?}");
        assert!(got[0].starts_with("key_set: missing field `cluster`"), "{got:#?}");
    }

    #[test]
    fn a_flood_of_problems_is_cut_short_with_a_note() {
        let records: Vec<String> =
            (0..600).map(|i| format!(r#"{{"id": "k{i}", "hash": "bad", "org": "o"}}"#)).collect();
        let got = fields(&format!(r#"{{"keys": [{}]}}"#, records.join(",")));
        assert_eq!(got.len(), MAX_PROBLEMS + 1);
        assert_eq!(got.last().map(String::as_str), Some("stopped after 500 problems; fix these first"));
    }

    #[test]
    fn an_inherited_reply_setting_is_blamed_and_repaired_once() {
        let got = fields(r#"{"errors": {"invalid_key": {"message": "{nope}"}}}"#);
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(got[0].starts_with("errors.invalid_key.message: "), "{got:#?}");
    }

    #[test]
    fn problems_keep_their_kind_and_a_record_read_alone_its_index() {
        let text = format!(
            r#"{{"keys": [{{"id": "a", "hash": "{H}", "org": "o"}}, {{"id": "a", "hash": "{H2}", "org": "o"}},
                {{"id": "b", "hash": "{H2}"}}], "unmatched": "x"}}"#
        );
        let got: Vec<(String, ErrorKind)> =
            check(text.as_bytes()).unwrap_err().into_iter().map(|p| (p.field, p.kind)).collect();
        assert_eq!(
            got,
            [
                ("keys[1].id".to_string(), ErrorKind::Duplicate { of: "keys[0]".into() }),
                ("keys[2]".to_string(), ErrorKind::Missing { name: "org".into() }),
                ("keys[2].hash".to_string(), ErrorKind::Duplicate { of: "keys[1]".into() }),
                ("unmatched".to_string(), ErrorKind::Unknown { allowed: &["authenticate", "deny"] }),
            ]
        );
    }

    #[test]
    fn only_a_syntax_error_keeps_its_position() {
        let got = check(b"{\n  \"keys\": [\n}").unwrap_err();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].kind, ErrorKind::Syntax);
        assert_eq!(got[0].position, Some(keygate_core::error::Position { line: 3, column: 1 }));
        let got = check(br#"{"keys": [{"id": "a"}]}"#).unwrap_err();
        assert!(got.iter().all(|p| p.position.is_none()), "{got:#?}");
    }

    #[test]
    fn a_missing_field_is_the_one_taken_out_only_if_its_path_matches() {
        let missing = ConfigError::of_kind(ErrorKind::Missing { name: "cluster".into() }, "key_set", "");
        assert!(lacks(&missing, "key_set.cluster"));
        assert!(!lacks(&missing, "key_set.path"));
        assert!(!lacks(&missing, "cluster"));
        let at_root = ConfigError::of_kind(ErrorKind::Missing { name: "cluster".into() }, "", "");
        assert!(lacks(&at_root, "cluster"));
        assert!(!lacks(&ConfigError::new("key_set", ""), "key_set.cluster"), "not a missing field");
    }
}
