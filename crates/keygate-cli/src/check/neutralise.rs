//! Taking a reading error out of a copy of a configuration: the field at fault is removed, or a
//! harmless placeholder put in its place, so that the next reading goes past it.

use keygate_core::error::{ConfigError, ErrorKind};
use keygate_core::keys::hash_key;
use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

/// Makes the reading error `error` go away in `value` without hiding any other problem; false if
/// it cannot (bad JSON, or a field that is not there).
pub fn neutralise(value: &mut Value, error: &ConfigError, n: &mut u64) -> bool {
    match &error.kind {
        ErrorKind::Syntax => false,
        // The path is the object that lacks the field.
        ErrorKind::Missing { name } => fill(value, &error.field, name, n),
        ErrorKind::Type | ErrorKind::Invalid | ErrorKind::Unknown { .. } | ErrorKind::Duplicate { .. } => {
            replace(value, &error.field, n)
        }
    }
}

/// Gives the object at `field` the required member `missing`, or takes the object out.
fn fill(value: &mut Value, field: &str, missing: &str, n: &mut u64) -> bool {
    let (segs, rest) = resolve(value, field);
    if !rest.is_empty() {
        return false;
    }
    let in_keys = matches!(segs.as_slice(), [k, Seg::Index(_)] if is(k, "keys"));
    let in_routes = matches!(segs.as_slice(), [k, Seg::Index(_)] if is(k, "routes"));
    let Some(Value::Object(object)) = get_mut(value, &segs) else { return false };
    match missing {
        "id" | "hash" | "org" if in_keys => {
            if let Some(v) = placeholder_record(n).remove(missing) {
                object.insert(missing.to_string(), v);
            }
            true
        }
        "path" if in_routes => {
            object.insert("path".into(), Value::String("/".into()));
            object.remove("bind");
            true
        }
        // Any other object that lacks a field (`key_set`) is an optional member: it goes.
        _ => match segs.split_last() {
            Some((Seg::Key(name), parent)) => remove(value, parent, name),
            _ => false,
        },
    }
}

/// Puts a placeholder in place of the value at `field`, or takes it out.
fn replace(value: &mut Value, field: &str, n: &mut u64) -> bool {
    let (segs, rest) = resolve(value, field);
    if !rest.is_empty() {
        return false;
    }
    let Some((last, parent)) = segs.split_last() else { return false };
    match (parent, last) {
        ([k], Seg::Index(_)) if is(k, "keys") => set(value, &segs, Value::Object(placeholder_record(n))),
        ([k], Seg::Index(_)) if is(k, "routes") => {
            let mut route = Map::new();
            route.insert("path".into(), Value::String("/".into()));
            set(value, &segs, Value::Object(route))
        }
        ([k, Seg::Index(_)], Seg::Key(f)) if is(k, "keys") && matches!(f.as_str(), "id" | "hash" | "org") => {
            let record = placeholder_record(n);
            let Some(v) = record.get(f.as_str()) else { return false };
            set(value, &segs, v.clone())
        }
        ([k, Seg::Index(_)], Seg::Key(f)) if is(k, "routes") && f == "path" => {
            if let Some(Value::Object(route)) = get_mut(value, parent) {
                route.remove("bind");
            }
            set(value, &segs, Value::String("/".into()))
        }
        // A header name set to null is disabled, and clashes with nothing.
        ([k], Seg::Key(f)) if is(k, "upstream") && f.ends_with("_header") => set(value, &segs, Value::Null),
        ([k, a], Seg::Key(_)) if is(k, "upstream") && is(a, "attribute_headers") => set(value, &segs, Value::Null),
        // An item of a list of strings (scopes, methods, headers, prefixes).
        (_, Seg::Index(_)) => set(value, &segs, Value::String(placeholder(n))),
        // Anything else is optional: left out, it takes its default.
        (_, Seg::Key(f)) => remove(value, parent, f),
    }
}

fn is(seg: &Seg, name: &str) -> bool {
    matches!(seg, Seg::Key(k) if k == name)
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
pub fn placeholder(n: &mut u64) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn error(kind: ErrorKind, field: &str) -> ConfigError {
        ConfigError::of_kind(kind, field, "")
    }

    #[test]
    fn a_missing_required_field_gets_a_placeholder_or_its_object_goes() {
        let mut n = 0;
        let mut value = json!({"keys": [{"id": "a", "hash": "h"}], "routes": [{"bind": {"v": "venue"}}],
                               "key_set": {"path": "/m"}});
        let missing = |name: &str| ErrorKind::Missing { name: name.into() };
        assert!(neutralise(&mut value, &error(missing("org"), "keys[0]"), &mut n));
        assert_eq!(value["keys"][0]["org"], "placeholder");
        assert!(neutralise(&mut value, &error(missing("path"), "routes[0]"), &mut n));
        assert_eq!(value["routes"][0], json!({"path": "/"}));
        assert!(neutralise(&mut value, &error(missing("cluster"), "key_set"), &mut n));
        assert_eq!(value.get("key_set"), None);
    }

    #[test]
    fn a_wrong_value_is_replaced_or_left_out() {
        let mut n = 0;
        let mut value = json!({"keys": [7, {"id": 1, "hash": "h", "org": "o", "colour": "red"}],
                               "upstream": {"org_header": 7}, "routes": [{"path": "/", "scopes": ["a", 7]}]});
        assert!(neutralise(&mut value, &error(ErrorKind::Type, "keys[0]"), &mut n));
        assert!(value["keys"][0]["id"].as_str().is_some_and(|id| id.starts_with("zzkeygatecheck")));
        assert!(neutralise(&mut value, &error(ErrorKind::Type, "keys[1].id"), &mut n));
        assert!(value["keys"][1]["id"].is_string());
        assert!(neutralise(&mut value, &error(ErrorKind::Unknown { allowed: &[] }, "keys[1].colour"), &mut n));
        assert_eq!(value["keys"][1].get("colour"), None);
        assert!(neutralise(&mut value, &error(ErrorKind::Type, "upstream.org_header"), &mut n));
        assert_eq!(value["upstream"]["org_header"], Value::Null);
        assert!(neutralise(&mut value, &error(ErrorKind::Type, "routes[0].scopes[1]"), &mut n));
        assert!(value["routes"][0]["scopes"][1].is_string());
        assert!(!neutralise(&mut value, &error(ErrorKind::Syntax, ""), &mut n));
        assert!(!neutralise(&mut value, &error(ErrorKind::Type, "routes[5]"), &mut n), "not there");
    }
}
