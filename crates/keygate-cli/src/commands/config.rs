//! `keygate config`: a plugin configuration made from a key-set file (printed alone or inside an
//! Envoy file), or the key set published in the live key-set layout (`--shards`).

use super::{emit, no_positionals, note, usage, Fail};
use crate::args::Parsed;
use crate::{clock, envoy, json, keyset, shards};
use keygate_core::plugin::Plugin;
use std::path::{Path, PathBuf};

/// The members of a plugin configuration, in the order the filter documents them.
const CONFIG_FIELDS: [&str; 8] =
    ["credential", "keys", "key_set", "routes", "unmatched", "scope_implies", "upstream", "errors"];

pub(super) fn config(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("config");
    no_positionals(p, "; config takes only options").map_err(&usage)?;
    let keys_path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    if let Some(dir) = p.os("--shards").map(PathBuf::from) {
        if p.os("--routes").is_some() || p.os("--envoy").is_some() {
            return Err(usage("--shards writes only the key set: leave out --routes and --envoy".into()));
        }
        let digits = match p.text("--digits").map_err(&usage)? {
            None => 1,
            Some(d) => {
                d.parse::<usize>().ok().filter(|d| *d <= 4).ok_or_else(|| usage("--digits: from 0 to 4".into()))?
            }
        };
        let version = match p.text("--manifest-version").map_err(&usage)? {
            Some(v) => v,
            None => (clock::now_ms().map_err(Fail::Error)? / 1_000).to_string(),
        };
        let set = keyset::read_existing(&keys_path).map_err(Fail::Error)?;
        return publish(&set.text, &dir, digits, &version).map_err(Fail::Error);
    }
    for only_with_shards in ["--digits", "--manifest-version"] {
        if p.os(only_with_shards).is_some() {
            return Err(usage(format!("{only_with_shards} goes with --shards")));
        }
    }
    let set = keyset::read_existing(&keys_path).map_err(Fail::Error)?;
    let keys_raw = member_texts(&set.text)
        .map_err(Fail::Error)?
        .into_iter()
        .find(|(name, _)| name == "keys")
        .map_or_else(|| "[]".to_string(), |(_, raw)| raw);

    // The Envoy file whose keygate configuration is replaced, if any.
    let envoy = match p.os("--envoy").map(PathBuf::from) {
        None => None,
        Some(path) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Fail::Error(format!("{shown}: cannot read: {}", keyset::io_reason(&e))))?;
            let mut scan = envoy::scan(&text).map_err(|(line, e)| Fail::Error(format!("{shown}:{line}: {e}")))?;
            if scan.found.len() != 1 {
                return Err(Fail::Error(format!(
                    "{shown}: expected one keygate filter with its configuration inline, found {}",
                    scan.found.len()
                )));
            }
            let found = scan.found.remove(0);
            Some((shown, text, found))
        }
    };

    let mut members: Vec<(String, String)> = Vec::new();
    if let Some(routes_path) = p.os("--routes").map(PathBuf::from) {
        let shown = routes_path.display();
        let text = std::fs::read(&routes_path)
            .map_err(|e| Fail::Error(format!("{shown}: cannot read: {}", keyset::io_reason(&e))))?;
        Plugin::from_json(&text)
            .map_err(|e| Fail::Error(format!("{shown}: {e} (`keygate check {shown}` lists every problem)")))?;
        members = member_texts(&text).map_err(Fail::Error)?;
        if members.iter().any(|(name, _)| name == "keys") {
            return Err(Fail::Error(format!(
                "{shown}: keys: the keys come from --keys {}; leave them out of this file",
                keys_path.display()
            )));
        }
    } else if let Some((shown, _, found)) = &envoy {
        // Everything but the keys stays as the Envoy file has it.
        Plugin::from_json(found.json.as_bytes()).map_err(|e| {
            Fail::Error(format!(
                "{shown}:{}: {} (`keygate check --envoy {shown}` lists every problem)",
                found.line_of(&e.first().field),
                e
            ))
        })?;
        members = member_texts(found.json.as_bytes()).map_err(Fail::Error)?;
        members.retain(|(name, _)| name != "keys");
    }
    members.push(("keys".into(), keys_raw));
    members.sort_by_key(|(name, _)| CONFIG_FIELDS.iter().position(|f| f == name).unwrap_or(usize::MAX));
    let body: Vec<String> =
        members.iter().map(|(name, raw)| format!("{}:{raw}", serde_json::Value::String(name.clone()))).collect();
    let compact = format!("{{{}}}", body.join(","));
    let out = json::pretty(compact.as_bytes()).map_err(Fail::Error)?;
    Plugin::from_json(out.as_bytes()).map_err(|e| Fail::Error(format!("the configuration made is not valid: {e}")))?;
    if set.keys.is_empty() {
        note(&format!(
            "keygate: {} holds no keys: the filter will refuse every request that needs one",
            keys_path.display()
        ));
    }
    match envoy {
        None => emit(&out),
        Some((shown, text, found)) => {
            let replaced =
                envoy::replace_block(&text, &found, &out).map_err(|e| Fail::Error(format!("{shown}: {e}")))?;
            emit(&replaced)
        }
    }
}

/// Writes the key set `text` into `dir` in the live layout and says so on standard error.
pub(super) fn publish(text: &[u8], dir: &Path, digits: usize, version: &str) -> Result<(), String> {
    let done = shards::publish(text, dir, digits, version)?;
    note(&format!(
        "keygate: wrote {} (version {version}) and {} shard{} holding {} key{}",
        dir.join("manifest.json").display(),
        done.shards,
        if done.shards == 1 { "" } else { "s" },
        done.keys,
        if done.keys == 1 { "" } else { "s" },
    ));
    Ok(())
}

/// Each top-level member of a JSON object: its name and its value's text as written.
fn member_texts(text: &[u8]) -> Result<Vec<(String, String)>, String> {
    let top = json::value_at(text, 0)?;
    let (members, _) = json::members(text, top.start)?;
    members
        .into_iter()
        .map(|m| {
            let raw =
                text.get(m.value.start..m.value.end).and_then(|b| std::str::from_utf8(b).ok()).ok_or("not UTF-8")?;
            Ok((m.name, raw.to_string()))
        })
        .collect()
}
