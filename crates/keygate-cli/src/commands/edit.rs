//! `keygate new`, `keygate rotate` and `keygate revoke`: the commands that change a key-set file, in place and under
//! its lock, after reading the change back with the filter's rules; with `--shards DIR`, they then
//! republish the key set there, as `keygate config --shards DIR` does.

use super::{check_prefix, config, emit, no_positionals, note, usage, Fail, DEFAULT_PREFIX};
use crate::args::Parsed;
use crate::{clock, keyset, shards};
use keygate_core::error::ConfigError;
use keygate_core::keys::hash_key;
use keygate_core::keys::record::{compile_key, preview, Expiry, RawKey, PREVIEW_ELLIPSIS};
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

/// The environment variable that gives `new` and `rotate` an `--expires` when none is given
/// (`KEYGATE_EXPIRES=365d`); `--expires never` overrides it.
pub(super) const DEFAULT_EXPIRES_VAR: &str = "KEYGATE_EXPIRES";

/// The `expires_at` of a key made now: `--expires`, else `$KEYGATE_EXPIRES`, else none; `never`
/// is none.
fn expiry_of(p: &Parsed, now_ms: i64) -> Result<Option<Expiry>, String> {
    let (text, from_env) = match p.text("--expires")? {
        Some(text) => (text, false),
        None => match std::env::var(DEFAULT_EXPIRES_VAR) {
            Ok(text) if !text.is_empty() => (text, true),
            _ => return Ok(None),
        },
    };
    if text == "never" {
        return Ok(None);
    }
    clock::expires_at(&text, now_ms).map(|at| Some(Expiry::Text(at))).map_err(|e| {
        if from_env {
            format!("{e} (from {DEFAULT_EXPIRES_VAR})")
        } else {
            e
        }
    })
}

/// Makes a key `{prefix}{id}_{secret}` for `record`: sets its id, hash, `created_at` (`now_ms`)
/// and `preview`, and returns the key, which nothing else keeps.
fn issue(record: &mut RawKey, prefix: &str, id: String, now_ms: i64) -> Result<String, Fail> {
    let secret = random_hex(32)?;
    let key = format!("{prefix}{id}_{secret}");
    record.hash = hex::encode(hash_key(key.as_bytes()));
    record.preview = Some(preview(prefix, &id, &secret));
    record.created_at = Some(clock::format_rfc3339(now_ms));
    record.id = id;
    Ok(key)
}

/// A random id that `taken` does not hold. 2^32 ids: a clash is rare, and then another id does.
fn fresh_id(taken: &HashSet<&str>) -> Result<String, Fail> {
    loop {
        let id = random_hex(4)?;
        if !taken.contains(id.as_str()) {
            return Ok(id);
        }
    }
}

/// With `--shards DIR`: publishes `text`, the key-set file `keys` as just written, into DIR in the
/// live layout with the width DIR already has and a new version ([`shards::republication`]). It
/// runs under the file's lock, so of two changes the later one is also published later. A failure
/// leaves the file changed and names the command that publishes it.
fn republish(text: &[u8], dir: Option<&Path>, keys: &Path) -> Result<(), Fail> {
    let Some(dir) = dir else { return Ok(()) };
    let now_s = clock::now_ms().map_err(Fail::Error)? / 1_000;
    let (digits, version) = shards::republication(dir, u64::try_from(now_s).unwrap_or_default());
    config::publish(text, dir, digits, &version).map_err(|e| {
        Fail::Error(format!(
            "{e}: {} is changed but not republished; `keygate config --keys {} --shards {}` publishes it",
            keys.display(),
            keys.display(),
            dir.display()
        ))
    })
}

fn prefix_option(p: &Parsed) -> Result<Option<String>, String> {
    let prefix = p.text("--prefix")?;
    if let Some(prefix) = &prefix {
        check_prefix(prefix)?;
    }
    Ok(prefix)
}

pub(super) fn new(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("new");
    no_positionals(p, "; new takes only options").map_err(&usage)?;
    let org = p.required_text("--org").map_err(&usage)?;
    let prefix = prefix_option(p).map_err(&usage)?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let given_id = p.text("--id").map_err(&usage)?;
    if let Some(id) = &given_id {
        if id.len() != 8 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(usage(format!("--id: expected 8 hex digits, got {id:?}")));
        }
    }
    let given_id = given_id.map(|id| id.to_ascii_lowercase());
    let shards_dir = p.os("--shards").map(PathBuf::from);
    if shards_dir.is_some() && p.os("--keys").is_none() {
        return Err(usage("--shards goes with --keys: it publishes that file".into()));
    }
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
    let mut record = RawKey {
        id: String::new(),
        hash: String::new(),
        org,
        name: p.text("--name").map_err(&usage)?,
        scopes: p.texts("--scope").map_err(&usage)?,
        attributes,
        expires_at: expiry_of(p, now).map_err(&usage)?,
        revoked: false,
        created_at: None,
        preview: None,
    };

    let Some(path) = p.os("--keys").map(PathBuf::from) else {
        let id = match &given_id {
            Some(id) => id.clone(),
            None => random_hex(4)?,
        };
        let key = issue(&mut record, &prefix, id, now)?;
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
        None => fresh_id(&taken)?,
    };
    let key = issue(&mut record, &prefix, id, now)?;
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
    emit(&format!("{key}\n")).map_err(|_| {
        Fail::Error(format!(
            "cannot write the key to standard output; it is lost: revoke it with `keygate revoke {} --keys {}`",
            record.id,
            path.display()
        ))
    })?;
    note(&format!("keygate: added key {} (org {}) to {}", record.id, record.org, path.display()));
    republish(&text, shards_dir.as_deref(), &path)?;
    drop(lock);
    Ok(())
}

/// The prefix a record's key has, as its `preview` shows it (`sk_live_` of `sk_live_{id}_…9f3a`).
fn prefix_of(record: &RawKey) -> Option<&str> {
    let head = record.preview.as_deref()?.split_once(PREVIEW_ELLIPSIS)?.0;
    head.strip_suffix('_')?.strip_suffix(record.id.as_str())
}

pub(super) fn rotate(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("rotate");
    let path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let old_id = match p.positionals.as_slice() {
        [id] => id.to_str().map(str::to_string).ok_or_else(|| usage("the ID is not valid UTF-8".into()))?,
        [] => return Err(usage("name the ID of the key to rotate".into())),
        _ => return Err(usage("rotate takes one ID".into())),
    };
    let given_prefix = prefix_option(p).map_err(&usage)?;
    let now = clock::now_ms().map_err(Fail::Error)?;
    let expires_at = expiry_of(p, now).map_err(&usage)?;
    let shards_dir = p.os("--shards").map(PathBuf::from);

    let target = keyset::target(&path);
    let lock = keyset::lock(&target).map_err(Fail::Error)?;
    let set = keyset::read_existing(&target).map_err(Fail::Error)?;
    let unchanged = |why: String| Fail::Error(format!("{}: {why}; nothing was changed", path.display()));
    let index =
        set.keys.iter().position(|k| k.id == old_id).ok_or_else(|| unchanged(format!("no key with id {old_id:?}")))?;
    let old = set.keys.get(index).ok_or_else(|| unchanged(format!("no key with id {old_id:?}")))?;
    if old.revoked {
        return Err(unchanged(format!(
            "key {old_id} is already revoked (rotated before?); `keygate new` makes a key with its settings"
        )));
    }
    let prefix =
        given_prefix.or_else(|| prefix_of(old).map(str::to_string)).unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    let mut successor = RawKey {
        id: String::new(),
        hash: String::new(),
        org: old.org.clone(),
        name: old.name.clone(),
        scopes: old.scopes.clone(),
        attributes: old.attributes.clone(),
        expires_at,
        revoked: false,
        created_at: None,
        preview: None,
    };
    let taken: HashSet<&str> = set.keys.iter().map(|k| k.id.as_str()).collect();
    let key = issue(&mut successor, &prefix, fresh_id(&taken)?, now)?;
    compile_key(&successor, "record").map_err(|e| usage(option_of(&e)))?;
    let line = keyset::record_line(&successor).map_err(Fail::Error)?;
    let text = keyset::with_record_revoked(&set.text, index).map_err(|e| edit_failed(&path, &e))?;
    let text = keyset::with_record_added(&text, &line).map_err(|e| edit_failed(&path, &e))?;
    let mut want = keyset::as_values(&set.keys);
    if let Some(serde_json::Value::Object(v)) = want.get_mut(index) {
        v.insert("revoked".into(), serde_json::Value::Bool(true));
    }
    want.extend(keyset::as_values(std::slice::from_ref(&successor)));
    verify(&path, &text, &want)?;
    keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
    emit(&format!("{key}\n")).map_err(|_| {
        Fail::Error(format!(
            "cannot write the new key to standard output; it is lost, and key {old_id} is revoked: \
             run `keygate rotate {} --keys {}` for another",
            successor.id,
            path.display()
        ))
    })?;
    note(&format!(
        "keygate: revoked key {old_id} and added its successor {} (org {}) to {}",
        successor.id,
        successor.org,
        path.display()
    ));
    if old.expires_at.is_some() && successor.expires_at.is_none() {
        note(&format!(
            "keygate: key {old_id} had an expiry and {} has none (give --expires, or set {DEFAULT_EXPIRES_VAR})",
            successor.id
        ));
    }
    republish(&text, shards_dir.as_deref(), &path)?;
    drop(lock);
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
    let shards_dir = p.os("--shards").map(PathBuf::from);
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
    if !changed.is_empty() {
        verify(&path, &text, &want)?;
        keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
        for id in changed {
            note(&format!("keygate: revoked key {id} in {}", path.display()));
        }
    }
    // Published even when nothing changed: DIR then holds what the file says.
    republish(&text, shards_dir.as_deref(), &path)?;
    drop(lock);
    Ok(())
}
