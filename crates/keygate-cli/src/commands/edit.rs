//! `keygate new` and `keygate revoke`: the commands that change a key-set file, in place and under
//! its lock, after reading the change back with the filter's rules.

use super::{check_prefix, emit, no_positionals, note, usage, Fail, DEFAULT_PREFIX};
use crate::args::Parsed;
use crate::{clock, keyset};
use keygate_core::error::ConfigError;
use keygate_core::keys::hash_key;
use keygate_core::keys::record::{compile_key, Expiry, RawKey};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

fn random_hex(bytes: usize) -> Result<String, Fail> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| Fail::Error(format!("the operating system's random source failed: {e}")))?;
    Ok(hex::encode(buf))
}

/// Which option a field of the new record came from.
fn option_of(e: &ConfigError) -> String {
    let field = e.field.strip_prefix("record.").unwrap_or(&e.field);
    let option = if field.starts_with("scopes") {
        "--scope".to_string()
    } else if let Some(name) = field.strip_prefix("attributes.") {
        format!("--attr {name}=…")
    } else if field == "attributes" {
        "--attr".to_string()
    } else {
        format!("--{field}")
    };
    format!("{option}: {}", e.message())
}

pub(super) fn new(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("new");
    no_positionals(p, "; new takes only options").map_err(&usage)?;
    let org = p.required_text("--org").map_err(&usage)?;
    let prefix = p.text("--prefix").map_err(&usage)?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    check_prefix(&prefix).map_err(&usage)?;
    let given_id = p.text("--id").map_err(&usage)?;
    if let Some(id) = &given_id {
        if id.len() != 8 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(usage(format!("--id: expected 8 hex digits, got {id:?}")));
        }
    }
    let given_id = given_id.map(|id| id.to_ascii_lowercase());
    let mut attributes = BTreeMap::new();
    for attr in p.texts("--attr").map_err(&usage)? {
        let Some((name, value)) = attr.split_once('=') else {
            return Err(usage(format!("--attr: expected NAME=VALUE, got {attr:?}")));
        };
        if attributes.insert(name.to_string(), value.to_string()).is_some() {
            return Err(usage(format!("--attr: {name} is given twice")));
        }
    }
    let now = clock::now_ms().map_err(Fail::Error)?;
    let expires_at = match p.text("--expires").map_err(&usage)? {
        Some(text) => Some(Expiry::Text(clock::expires_at(&text, now).map_err(&usage)?)),
        None => None,
    };
    let mut record = RawKey {
        id: String::new(),
        hash: String::new(),
        org,
        name: p.text("--name").map_err(&usage)?,
        scopes: p.texts("--scope").map_err(&usage)?,
        attributes,
        expires_at,
        revoked: false,
        created_at: None,
        preview: None,
    };
    let mut make_key = |id: String| -> Result<String, Fail> {
        let key = format!("{prefix}{id}_{}", random_hex(32)?);
        record.id = id;
        record.hash = hex::encode(hash_key(key.as_bytes()));
        Ok(key)
    };

    let Some(path) = p.os("--keys").map(PathBuf::from) else {
        let key = make_key(match &given_id {
            Some(id) => id.clone(),
            None => random_hex(4)?,
        })?;
        compile_key(&record, "record").map_err(|e| usage(option_of(&e)))?;
        let line = keyset::record_line(&record).map_err(Fail::Error)?;
        emit(&format!("{key}\n")).map_err(|_| Fail::Error("cannot write the key to standard output".into()))?;
        note(&line);
        return Ok(());
    };

    let target = keyset::target(&path);
    let lock = keyset::lock(&target).map_err(Fail::Error)?;
    let existing = keyset::read(&target).map_err(Fail::Error)?;
    let old_keys = existing.as_ref().map(|k| k.keys.as_slice()).unwrap_or_default();
    let taken: HashSet<&str> = old_keys.iter().map(|k| k.id.as_str()).collect();
    let id = match &given_id {
        Some(id) if taken.contains(id.as_str()) => {
            return Err(Fail::Error(format!("{}: already has a key with id {id}", path.display())));
        }
        Some(id) => id.clone(),
        // 2^32 ids: a clash is rare, and then another id does.
        None => loop {
            let id = random_hex(4)?;
            if !taken.contains(id.as_str()) {
                break id;
            }
        },
    };
    let key = make_key(id)?;
    compile_key(&record, "record").map_err(|e| usage(option_of(&e)))?;
    let line = keyset::record_line(&record).map_err(Fail::Error)?;
    let text = match &existing {
        None => keyset::new_file(&line).into_bytes(),
        Some(set) => keyset::with_record_added(&set.text, &line).map_err(|e| edit_failed(&path, &e))?,
    };
    let mut want = keyset::as_values(old_keys);
    want.extend(keyset::as_values(std::slice::from_ref(&record)));
    verify(&path, &text, &want)?;
    keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
    drop(lock);
    emit(&format!("{key}\n")).map_err(|_| {
        Fail::Error(format!(
            "cannot write the key to standard output; it is lost: revoke it with `keygate revoke {} --keys {}`",
            record.id,
            path.display()
        ))
    })?;
    note(&format!("keygate: added key {} (org {}) to {}", record.id, record.org, path.display()));
    Ok(())
}

fn edit_failed(path: &Path, why: &str) -> Fail {
    Fail::Error(format!("{}: cannot change the file in place ({why}); it is left as it is", path.display()))
}

/// Reads back an edited key set before it is written: the filter must accept it, and it must hold
/// exactly the records wanted.
fn verify(path: &Path, text: &[u8], want: &[serde_json::Value]) -> Result<(), Fail> {
    let keys = keyset::parse(text).map_err(|e| edit_failed(path, &e))?;
    if keyset::as_values(&keys) != want {
        return Err(edit_failed(path, "the change did not read back as intended"));
    }
    Ok(())
}

pub(super) fn revoke(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("revoke");
    let path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let ids: Vec<String> = p
        .positionals
        .iter()
        .map(|a| a.to_str().map(str::to_string).ok_or_else(|| usage("an ID is not valid UTF-8".into())))
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(usage("name the ID of the key to revoke".into()));
    }
    let target = keyset::target(&path);
    let lock = keyset::lock(&target).map_err(Fail::Error)?;
    let set = keyset::read_existing(&target).map_err(Fail::Error)?;
    let mut indices = Vec::new();
    for id in &ids {
        let index =
            set.keys.iter().position(|k| &k.id == id).ok_or_else(|| {
                Fail::Error(format!("{}: no key with id {id:?}; nothing was changed", path.display()))
            })?;
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    let mut text = set.text.clone();
    let mut want = keyset::as_values(&set.keys);
    let mut changed = Vec::new();
    for &i in &indices {
        let Some(record) = set.keys.get(i) else { continue };
        if record.revoked {
            note(&format!("keygate: key {} in {} was already revoked", record.id, path.display()));
            continue;
        }
        text = keyset::with_record_revoked(&text, i).map_err(|e| edit_failed(&path, &e))?;
        if let Some(serde_json::Value::Object(v)) = want.get_mut(i) {
            v.insert("revoked".into(), serde_json::Value::Bool(true));
        }
        changed.push(record.id.as_str());
    }
    if changed.is_empty() {
        return Ok(());
    }
    verify(&path, &text, &want)?;
    keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
    drop(lock);
    for id in changed {
        note(&format!("keygate: revoked key {id} in {}", path.display()));
    }
    Ok(())
}
