//! `keygate config --shards DIR`: the live key-set format (README, "Key distribution"): the
//! records sharded by the first `digits` hex digits of their hash, one shard document
//! `{"keys": [...]}` per prefix at `DIR/shards/<prefix or "all">.json`, and `DIR/manifest.json`
//! listing every shard with its path and the SHA-256 of its bytes.
//!
//! Shards are written first and the manifest last, each atomically, under a lock on
//! `DIR/manifest.json.lock`, so an endpoint serving DIR never offers a manifest whose shards are not
//! there yet, and two publishers take turns. What is written is read back with the filter's own
//! manifest and shard checks.

use crate::{json, keyset};
use keygate_core::live::{parse_manifest, parse_shard};
use std::fs;
use std::path::Path;

/// What was published.
#[derive(Debug, PartialEq, Eq)]
pub struct Published {
    pub shards: usize,
    pub keys: usize,
}

/// Writes the shards and manifest of the key set `text` (a key-set file's bytes) into `dir`.
pub fn publish(text: &[u8], dir: &Path, digits: usize, version: &str) -> Result<Published, String> {
    if digits > 4 {
        return Err("--digits: from 0 to 4".into());
    }
    let records = record_lines(text)?;
    let shard_dir = dir.join("shards");
    fs::create_dir_all(&shard_dir)
        .map_err(|e| format!("{}: cannot create: {}", shard_dir.display(), keyset::io_reason(&e)))?;
    let manifest_path = dir.join("manifest.json");
    let lock = keyset::lock(&manifest_path)?;
    let count = 1usize << (4 * digits);
    let mut entries = Vec::with_capacity(count);
    let mut documents = Vec::with_capacity(count);
    for n in 0..count {
        let prefix = if digits == 0 { String::new() } else { format!("{n:0digits$x}") };
        let inside: Vec<&str> =
            records.iter().filter(|(hash, _)| hash.starts_with(&prefix)).map(|(_, line)| line.as_str()).collect();
        let document = if inside.is_empty() {
            "{\"keys\": []}\n".to_string()
        } else {
            format!("{{\"keys\": [\n  {}\n]}}\n", inside.join(",\n  "))
        };
        let name = if prefix.is_empty() { "all".to_string() } else { prefix.clone() };
        let path = format!("shards/{name}.json");
        let etag = hex::encode(keygate_core::keys::hash_key(document.as_bytes()));
        entries.push(format!(
            "{{\"prefix\": {}, \"path\": {}, \"etag\": \"{etag}\"}}",
            serde_json::Value::String(prefix),
            serde_json::Value::String(path.clone())
        ));
        documents.push((path, document));
    }
    let manifest = format!(
        "{{\"version\": {},\n \"shards\": [\n  {}\n]}}\n",
        serde_json::Value::String(version.to_string()),
        entries.join(",\n  ")
    );

    // Read back with the filter's checks before anything is written.
    let checked =
        parse_manifest(manifest.as_bytes()).map_err(|e| format!("internal: the manifest made is refused: {e}"))?;
    let mut keys = 0;
    for (shard, (_, document)) in checked.shards.iter().zip(&documents) {
        keys += parse_shard(shard, document.as_bytes())
            .map_err(|e| format!("internal: a shard made is refused: {e}"))?
            .len();
    }
    if keys != records.len() {
        return Err("internal: the shards do not hold every key exactly once".into());
    }

    for (path, document) in &documents {
        let target = dir.join(path);
        // An unchanged shard is left alone: same bytes, same etag.
        if fs::read(&target).is_ok_and(|old| old == document.as_bytes()) {
            continue;
        }
        keyset::write_atomic(&target, document.as_bytes(), &lock)?;
    }
    keyset::write_atomic(&manifest_path, manifest.as_bytes(), &lock)?;
    Ok(Published { shards: count, keys })
}

/// Each record of a key-set file as (lowercase hash, one line of JSON as written, in file order).
fn record_lines(text: &[u8]) -> Result<Vec<(String, String)>, String> {
    let keys = keyset::parse(text)?;
    let top = json::value_at(text, 0)?;
    let (members, _) = json::members(text, top.start)?;
    let Some(list) = members.iter().find(|m| m.name == "keys") else { return Ok(Vec::new()) };
    let (spans, _) = json::elements(text, list.value.start)?;
    spans
        .iter()
        .zip(&keys)
        .map(|(span, key)| {
            let raw = text.get(span.start..span.end).ok_or("bad span")?;
            Ok((key.hash.to_ascii_lowercase(), json::inline(raw)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::live::ShardRef;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("keygate-shards-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn shards_by_hash_prefix_and_lists_them_in_a_manifest_the_filter_accepts() {
        let h = |c: char| c.to_string().repeat(64);
        let text = format!(
            r#"{{"keys": [{{"id": "a", "hash": "{}", "org": "o"}}, {{"id": "b", "hash": "{}", "org": "o"}}, {{"id": "c", "hash": "{}", "org": "o", "revoked": true}}]}}"#,
            h('0'),
            h('F'),
            h('f').replacen('f', "0", 1)
        );
        let d = dir("one");
        assert_eq!(publish(text.as_bytes(), &d, 1, "7").unwrap(), Published { shards: 16, keys: 3 });
        let manifest = parse_manifest(&fs::read(d.join("manifest.json")).unwrap()).unwrap();
        assert_eq!(manifest.version, "7");
        let mut ids = Vec::new();
        for shard in &manifest.shards {
            let body = fs::read(d.join(&shard.path)).unwrap();
            for (_, key) in parse_shard(shard, &body).unwrap() {
                ids.push((shard.prefix.clone(), key.id));
            }
        }
        assert_eq!(ids, [("0".into(), "a".into()), ("0".into(), "c".into()), ("f".into(), "b".into())]);
        let f: ShardRef = manifest.shards.into_iter().find(|s| s.prefix == "f").unwrap();
        assert_eq!(f.path, "shards/f.json");

        assert_eq!(publish(text.as_bytes(), &d, 0, "8").unwrap(), Published { shards: 1, keys: 3 });
        let manifest = parse_manifest(&fs::read(d.join("manifest.json")).unwrap()).unwrap();
        assert_eq!((manifest.shards[0].prefix.as_str(), manifest.shards[0].path.as_str()), ("", "shards/all.json"));
        assert!(publish(text.as_bytes(), &d, 5, "9").is_err());
        let _ = fs::remove_dir_all(&d);
    }
}
