//! `keygate check`: every problem of a plugin configuration, found by the filter's own code.
//!
//! The filter stops at the first problem. To find the others, check runs the filter's parser and
//! compiler ([`Plugin::from_json`]) again and again: after each problem it neutralises the field
//! at fault in a copy of the configuration (removes it, or puts a harmless placeholder in its
//! place) and runs again, until the configuration compiles. Every message is the filter's own.

use crate::envoy;
use crate::json;
use keygate_core::error::ConfigError;
use keygate_core::keys::record::{compile_key, compile_keys, RawKey};
use keygate_core::keys::{hash_key, KeyHash};
use keygate_core::plugin::Plugin;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

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
    let first = match Plugin::from_json(text) {
        Ok(plugin) => return Ok(Summary { keys: plugin.policy.keys.len(), routes: plugin.policy.routes.len() }),
        Err(e) => e,
    };
    // Bad JSON, or not an object: that one problem is all there is to say.
    let mut value: Value = match serde_json::from_slice(text) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err(vec![tidy_syntax(first)]),
    };
    let mut problems = vec![tidy(first)];
    let mut placeholders = 0u64;
    // Each key record alone first (a record's problems do not depend on the rest), so that a large
    // key set with many bad records costs one pass over it, not one per problem.
    if let Some(Value::Array(records)) = value.get_mut("keys") {
        for (i, record) in records.iter_mut().enumerate() {
            let fine = RawKey::deserialize(&*record).is_ok_and(|raw| compile_key(&raw, "").is_ok());
            if fine {
                continue;
            }
            let mut alone = Map::new();
            alone.insert("keys".into(), Value::Array(vec![record.take()]));
            let mut alone = Value::Object(alone);
            for e in settle(&mut alone, &mut placeholders, MAX_PROBLEMS.saturating_sub(problems.len())) {
                let field = match e.field.strip_prefix("keys[0]") {
                    Some(rest) => format!("keys[{i}]{rest}"),
                    None => e.field,
                };
                push_new(&mut problems, ConfigError::new(field, e.message));
            }
            if let Some(settled) = alone.pointer_mut("/keys/0") {
                *record = settled.take();
            }
        }
        for e in duplicates(records, &mut placeholders) {
            push_new(&mut problems, e);
        }
    }
    for e in settle(&mut value, &mut placeholders, MAX_PROBLEMS.saturating_sub(problems.len())) {
        push_new(&mut problems, e);
    }
    // In the order of the text: the offset of each field (or of what exists of its path).
    let mut locator = json::Locator::new(text);
    problems.sort_by_cached_key(|p| locator.locate(&p.field).unwrap_or(0));
    if problems.len() >= MAX_PROBLEMS {
        problems.push(ConfigError::new("", format!("stopped after {MAX_PROBLEMS} problems; fix these first")));
    }
    Err(problems)
}

/// Compiles `value` again and again, neutralising each problem found, until it compiles, a problem
/// cannot be neutralised, or `limit` problems are found; returns the problems.
fn settle(value: &mut Value, placeholders: &mut u64, limit: usize) -> Vec<ConfigError> {
    let mut found: Vec<ConfigError> = Vec::new();
    let mut neutralised: Vec<String> = Vec::new();
    let mut last: Option<ConfigError> = None;
    while found.len() < limit {
        let Ok(bytes) = serde_json::to_vec(value) else { break };
        let error = match Plugin::from_json(&bytes) {
            Ok(_) => break,
            Err(e) => tidy(e),
        };
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

/// Duplicate ids and hashes among valid records, in one pass, each reported as the filter reports
/// it (its message, from compiling the two records together) and neutralised with a placeholder.
fn duplicates(records: &mut [Value], placeholders: &mut u64) -> Vec<ConfigError> {
    let mut found = Vec::new();
    let mut ids: HashMap<String, (usize, RawKey)> = HashMap::new();
    let mut hashes: HashMap<KeyHash, (usize, RawKey)> = HashMap::new();
    for (i, record) in records.iter_mut().enumerate() {
        let Ok(mut raw) = RawKey::deserialize(&*record) else { continue };
        let Ok((mut hash, _)) = compile_key(&raw, "") else { continue };
        let mut report = |(j, earlier): &(usize, RawKey), raw: &RawKey| {
            if let Err(e) = compile_keys(&[earlier.clone(), raw.clone()], "keys") {
                let field = e.field.replacen("keys[1]", &format!("keys[{i}]"), 1);
                found.push(ConfigError::new(field, e.message.replace("(also keys[0])", &format!("(also keys[{j}])"))));
            }
        };
        if let Some(first) = ids.get(&raw.id) {
            report(first, &raw);
            raw.id = placeholder(placeholders);
            if let Some(object) = record.as_object_mut() {
                object.insert("id".into(), Value::String(raw.id.clone()));
            }
        }
        if let Some(first) = hashes.get(&hash) {
            report(first, &raw);
            let id = placeholder(placeholders);
            hash = hash_key(id.as_bytes());
            raw.hash = hex::encode(hash);
            if let Some(object) = record.as_object_mut() {
                object.insert("hash".into(), Value::String(raw.hash.clone()));
            }
        }
        ids.insert(raw.id.clone(), (i, raw.clone()));
        hashes.insert(hash, (i, raw));
    }
    found
}

/// True if `error` is `missing field `X`` at the object whose field X is `field`.
fn lacks(error: &ConfigError, field: &str) -> bool {
    let Some(name) = error.message.strip_prefix("missing field `").and_then(|m| m.split_once('`')).map(|(f, _)| f)
    else {
        return false;
    };
    let expected = if error.field.is_empty() { name.to_string() } else { format!("{}.{name}", error.field) };
    field == expected
}

fn push_new(problems: &mut Vec<ConfigError>, e: ConfigError) {
    if problems.len() < MAX_PROBLEMS && !problems.contains(&e) {
        problems.push(e);
    }
}

/// serde's messages end with the line and column in the text it read: for the copies check
/// compiles, that position means nothing, so it goes (the field path says where).
fn tidy(mut e: ConfigError) -> ConfigError {
    if let Some(at) = e.message.rfind(" at line ") {
        let tail = e.message.get(at + " at line ".len()..).unwrap_or_default();
        let position = tail.split_once(" column ").is_some_and(|(l, c)| {
            !l.is_empty()
                && l.bytes().all(|b| b.is_ascii_digit())
                && !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_digit())
        });
        if position {
            e.message.truncate(at);
        }
    }
    e
}

/// A JSON syntax error keeps its line and column; where serde_path_to_error could not name the
/// field it was reading (`keys[0].?`), the path stops at what it could name.
fn tidy_syntax(mut e: ConfigError) -> ConfigError {
    if let Some(known) = e.field.strip_suffix('?') {
        let known = known.strip_suffix('.').unwrap_or(known).len();
        e.field.truncate(known);
    }
    e
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// The segments of `field` that exist in `value`, and the part of `field` that does not.
fn resolve<'f>(value: &Value, field: &'f str) -> (Vec<Seg>, &'f str) {
    let mut segs = Vec::new();
    let mut node = value;
    let mut rest = field;
    loop {
        let here = rest.strip_prefix('.').unwrap_or(rest);
        if here.is_empty() {
            return (segs, here);
        }
        match node {
            Value::Object(map) => {
                let found = map
                    .iter()
                    .filter(|(name, _)| {
                        here.strip_prefix(name.as_str())
                            .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
                    })
                    .max_by_key(|(name, _)| name.len());
                let Some((name, next)) = found else { return (segs, rest) };
                rest = here.get(name.len()..).unwrap_or_default();
                segs.push(Seg::Key(name.clone()));
                node = next;
            }
            Value::Array(items) => {
                let parsed = here
                    .strip_prefix('[')
                    .and_then(|s| s.split_once(']'))
                    .and_then(|(i, after)| i.parse::<usize>().ok().map(|i| (i, after)));
                let Some((index, after)) = parsed else { return (segs, rest) };
                let Some(next) = items.get(index) else { return (segs, rest) };
                rest = after;
                segs.push(Seg::Index(index));
                node = next;
            }
            _ => return (segs, rest),
        }
    }
}

fn get_mut<'v>(value: &'v mut Value, segs: &[Seg]) -> Option<&'v mut Value> {
    segs.iter().try_fold(value, |node, seg| match (seg, node) {
        (Seg::Key(k), Value::Object(map)) => map.get_mut(k),
        (Seg::Index(i), Value::Array(items)) => items.get_mut(*i),
        _ => None,
    })
}

/// A placeholder no real configuration holds: letters only, so that it is a valid scope, method,
/// header name or prefix, and different each time, so that it is never a duplicate.
fn placeholder(n: &mut u64) -> String {
    *n += 1;
    let mut s = String::from("zzkeygatecheck");
    let mut k = *n;
    while k > 0 {
        s.push(char::from(b'a' + (k % 26) as u8));
        k /= 26;
    }
    s
}

fn placeholder_record(n: &mut u64) -> Map<String, Value> {
    let id = placeholder(n);
    let hash = hex::encode(hash_key(id.as_bytes()));
    let mut record = Map::new();
    record.insert("id".into(), Value::String(id));
    record.insert("hash".into(), Value::String(hash));
    record.insert("org".into(), Value::String("placeholder".into()));
    record
}

/// Makes `error` go away in `value` without hiding any other problem; false if it cannot.
fn neutralise(value: &mut Value, error: &ConfigError, n: &mut u64) -> bool {
    let key = |s: &Seg, name: &str| matches!(s, Seg::Key(k) if k == name);
    // `missing field `org``: the path is the object that lacks it.
    if let Some(missing) = error.message.strip_prefix("missing field `").and_then(|m| m.split_once('`')).map(|(f, _)| f)
    {
        let (segs, rest) = resolve(value, &error.field);
        if !rest.is_empty() {
            return false;
        }
        let in_keys = matches!(segs.as_slice(), [k, Seg::Index(_)] if key(k, "keys"));
        let in_routes = matches!(segs.as_slice(), [k, Seg::Index(_)] if key(k, "routes"));
        let Some(Value::Object(object)) = get_mut(value, &segs) else { return false };
        match missing {
            "id" | "hash" | "org" if in_keys => {
                if let Some(v) = placeholder_record(n).remove(missing) {
                    object.insert(missing.to_string(), v);
                }
            }
            "path" if in_routes => {
                object.insert("path".into(), Value::String("/".into()));
                object.remove("bind");
            }
            // Any other object that lacks a field (`key_set`) is an optional member: it goes.
            _ => {
                return match segs.split_last() {
                    Some((Seg::Key(name), parent)) => remove(value, parent, name),
                    _ => false,
                }
            }
        }
        return true;
    }
    let (mut segs, rest) = resolve(value, &error.field);
    if !rest.is_empty() {
        // `revoked_key` inherits what it lacks from `invalid_key`: the fault may be there.
        let Some(inherited) = error.field.strip_prefix("errors.revoked_key") else { return false };
        let field = format!("errors.invalid_key{inherited}");
        let (s, r) = resolve(value, &field);
        if !r.is_empty() {
            return false;
        }
        segs = s;
    }
    let Some((last, parent)) = segs.split_last() else { return false };
    match (parent, last) {
        ([k], Seg::Index(_)) if key(k, "keys") => set(value, &segs, Value::Object(placeholder_record(n))),
        ([k], Seg::Index(_)) if key(k, "routes") => {
            let mut route = Map::new();
            route.insert("path".into(), Value::String("/".into()));
            set(value, &segs, Value::Object(route))
        }
        ([k, Seg::Index(_)], Seg::Key(f)) if key(k, "keys") && matches!(f.as_str(), "id" | "hash" | "org") => {
            let record = placeholder_record(n);
            let Some(v) = record.get(f.as_str()) else { return false };
            set(value, &segs, v.clone())
        }
        ([k, Seg::Index(_)], Seg::Key(f)) if key(k, "keys") && f == "attributes" => {
            match get_mut(value, &segs) {
                // "attribute names must be non-empty": only the nameless one goes.
                Some(Value::Object(attributes)) if attributes.contains_key("") => attributes.remove("").is_some(),
                _ => remove(value, parent, f),
            }
        }
        ([k, Seg::Index(_)], Seg::Key(f)) if key(k, "routes") && f == "path" => {
            let route_segs = parent.to_vec();
            if let Some(Value::Object(route)) = get_mut(value, &route_segs) {
                route.remove("bind");
            }
            set(value, &segs, Value::String("/".into()))
        }
        // A header name set to null is disabled, and clashes with nothing.
        ([k], Seg::Key(f)) if key(k, "upstream") && f.ends_with("_header") => set(value, &segs, Value::Null),
        ([k, a], Seg::Key(_)) if key(k, "upstream") && key(a, "attribute_headers") => set(value, &segs, Value::Null),
        // An item of a list of strings (scopes, methods, headers, prefixes).
        (_, Seg::Index(_)) => set(value, &segs, Value::String(placeholder(n))),
        // Anything else is optional: left out, it takes its default.
        (_, Seg::Key(f)) => remove(value, parent, f),
    }
}

fn set(value: &mut Value, segs: &[Seg], new: Value) -> bool {
    match get_mut(value, segs) {
        Some(slot) if *slot != new => {
            *slot = new;
            true
        }
        _ => false,
    }
}

fn remove(value: &mut Value, parent: &[Seg], name: &str) -> bool {
    match get_mut(value, parent) {
        Some(Value::Object(map)) => map.remove(name).is_some(),
        _ => false,
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
                writeln!(out, "{label}: {}", described(&p))?;
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
                    writeln!(out, "{label}:{}: {}", found.line_of(&p.field), described(&p))?;
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

fn described(p: &ConfigError) -> String {
    if p.field.is_empty() {
        p.message.clone()
    } else {
        format!("{}: {}", p.field, p.message)
    }
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
            "keys[1].colour: unknown field `colour`, expected one of `id`, `hash`, `org`, `name`, `scopes`, `attributes`, `expires_at`, `revoked`",
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
}
