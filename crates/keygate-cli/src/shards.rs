//! `keygate config --shards DIR`: the live key-set layout (README, "Key distribution"), laid out
//! by keygate-core's [`layout`](keygate_core::layout) (the one writer of the format) and written
//! into DIR.
//!
//! Shards are written first and the manifest last, each atomically, under a lock on
//! `DIR/manifest.json.lock`, so an endpoint serving DIR never offers a manifest whose shards are not
//! there yet, and two publishers take turns. What is written is read back with the filter's own
//! manifest and shard checks.

use crate::{json, keyset};
use keygate_core::layout::{self, Layout, Record};
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
    if digits > layout::MAX_DIGITS {
        return Err(format!("--digits: from 0 to {}", layout::MAX_DIGITS));
    }
    let lines = record_lines(text)?;
    let record_count = lines.len();
    let records: Vec<Record<'_>> = lines.iter().map(|(hash, json)| Record { hash, json }).collect();
    let made = Layout::new(&records, digits, version).map_err(|e| format!("internal: {e}"))?;
    let shard_count = made.shards.len();
    drop(records);
    drop(lines);
    let files = made.into_files();

    // Read back with the filter's checks before anything is written.
    let Some(((_, manifest), shard_files)) = files.split_last() else {
        return Err("internal: no manifest was made".into());
    };
    let checked = parse_manifest(manifest).map_err(|e| format!("internal: the manifest made is refused: {e}"))?;
    let mut keys = 0;
    for (shard, (_, document)) in checked.shards.iter().zip(shard_files) {
        keys += parse_shard(shard, document).map_err(|e| format!("internal: a shard made is refused: {e}"))?.len();
    }
    if keys != record_count || checked.shards.len() != shard_count {
        return Err("internal: the shards do not hold every key exactly once".into());
    }

    let shard_dir = dir.join("shards");
    fs::create_dir_all(&shard_dir)
        .map_err(|e| format!("{}: cannot create: {}", shard_dir.display(), keyset::io_reason(&e)))?;
    let manifest_path = dir.join(layout::MANIFEST_PATH);
    let lock = keyset::lock(&manifest_path)?;
    for (path, document) in shard_files {
        let target = dir.join(path);
        // An unchanged shard is left alone: same bytes, same etag.
        if fs::read(&target).is_ok_and(|old| &old == document) {
            continue;
        }
        keyset::write_atomic(&target, document, &lock)?;
    }
    keyset::write_atomic(&manifest_path, manifest, &lock)?;
    Ok(Published { shards: shard_count, keys })
}

/// How the edit commands' `--shards DIR` republishes DIR: the shards' width already there (one hex
/// digit, 16 shards, when DIR holds no manifest the filter would read), so a republication never
/// changes the layout, and a version past the one there: `now_s`, or the old one plus one when that
/// is an integer at least as large, so each republication's version is new and rises (the
/// `keygate.key_set.version` gauge shows it).
pub fn republication(dir: &Path, now_s: u64) -> (usize, String) {
    let old = fs::read(dir.join(layout::MANIFEST_PATH)).ok().and_then(|m| parse_manifest(&m).ok());
    let digits = old.as_ref().map_or(1, |m| m.width());
    let version = match old.and_then(|m| m.version.parse::<u64>().ok()) {
        Some(v) if v >= now_s => v.saturating_add(1),
        _ => now_s,
    };
    (digits, version.to_string())
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

    #[test]
    fn a_republication_keeps_the_published_width_and_gets_a_new_rising_version() {
        let text = format!(r#"{{"keys": [{{"id": "a", "hash": "{}", "org": "o"}}]}}"#, "0".repeat(64));
        let d = dir("again");
        assert_eq!(republication(&d, 1_800_000_000), (1, "1800000000".into()), "nothing published yet");
        publish(text.as_bytes(), &d, 2, "1700000000").unwrap();
        assert_eq!(republication(&d, 1_800_000_000), (2, "1800000000".into()));
        publish(text.as_bytes(), &d, 0, "1800000000").unwrap();
        assert_eq!(republication(&d, 1_800_000_000), (0, "1800000001".into()), "published this second");
        publish(text.as_bytes(), &d, 1, "v7").unwrap();
        assert_eq!(republication(&d, 1_800_000_000), (1, "1800000000".into()), "a version that is no number");
        fs::write(d.join("manifest.json"), "{").unwrap();
        assert_eq!(republication(&d, 5), (1, "5".into()), "a manifest the filter would refuse");
        let _ = fs::remove_dir_all(&d);
    }
}
