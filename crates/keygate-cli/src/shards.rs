//! `keygate config --shards DIR`: the live key-set layout (README, "Key distribution"), laid out
//! by keygate-core's [`layout`](keygate_core::layout) (the one writer of the format) and written
//! into DIR.
//!
//! Shards are written first and the manifest last, each atomically, under a lock on
//! `DIR/manifest.json.lock`, so an endpoint serving DIR never offers a manifest whose shards are not
//! there yet, and two publishers take turns. What is written is read back with the filter's own
//! manifest and shard checks.
//!
//! A file is rewritten only when its bytes change, and a changed manifest lands in a later second
//! of the wall clock than the one it replaces: a static origin such as nginx makes its `ETag` from
//! the file's modification time in whole seconds and its size, and a revocation changes neither
//! the manifest's size nor, within one second, its mtime. Written in the same second, the new
//! manifest would keep the old `ETag`, the filter's `If-None-Match` would be answered `304`, and
//! the revocation would never load ([`wait_before_replacing`]).

use crate::{json, keyset};
use keygate_core::layout::{self, Layout, Record};
use keygate_core::live::{parse_manifest, parse_shard};
use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Past the next whole second, how much longer a changed manifest waits: a file system stamps
/// files from a clock that may trail the wall clock by a timer tick (at most 10 ms on Linux).
pub const STAMP_MARGIN: Duration = Duration::from_millis(20);

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
    match fs::read(&manifest_path) {
        // Unchanged: its ETag too, wherever it is served.
        Ok(old) if &old == manifest => {}
        _ => {
            let replaced = fs::metadata(&manifest_path).and_then(|m| m.modified()).ok();
            if let Some(wait) = replaced.and_then(|at| wait_before_replacing(at, SystemTime::now())) {
                std::thread::sleep(wait);
            }
            keyset::write_atomic(&manifest_path, manifest, &lock)?;
        }
    }
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

/// How long to wait, at `now`, before replacing a file last modified at `modified` so that the new
/// file's modification time falls in a later whole second (and [`STAMP_MARGIN`] into it); `None`
/// when it already would. At most a second and the margin, whatever the clock says: a file stamped
/// further ahead (a clock stepped back since) is not waited out.
pub fn wait_before_replacing(modified: SystemTime, now: SystemTime) -> Option<Duration> {
    let second = modified.duration_since(UNIX_EPOCH).ok()?.as_secs();
    let next = UNIX_EPOCH + Duration::from_secs(second.checked_add(1)?) + STAMP_MARGIN;
    let wait = next.duration_since(now).ok().filter(|w| !w.is_zero())?;
    Some(wait.min(Duration::from_secs(1) + STAMP_MARGIN))
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

    #[test]
    fn a_replaced_file_is_waited_on_until_the_second_after_its_modification_time() {
        let at = |ms: u64| UNIX_EPOCH + Duration::from_millis(ms);
        let (second, margin) = (Duration::from_secs(1), STAMP_MARGIN);
        // Written at 100.2 s: until 101 s and the margin.
        assert_eq!(wait_before_replacing(at(100_200), at(100_200)), Some(Duration::from_millis(800) + margin));
        assert_eq!(wait_before_replacing(at(100_200), at(100_999)), Some(Duration::from_millis(1) + margin));
        assert_eq!(wait_before_replacing(at(100_000), at(100_000)), Some(second + margin));
        // Within the margin of the next second, or past it: only the rest, or nothing.
        assert_eq!(wait_before_replacing(at(100_200), at(101_010)), Some(margin - Duration::from_millis(10)));
        assert_eq!(wait_before_replacing(at(100_200), at(101_020)), None);
        assert_eq!(wait_before_replacing(at(100_200), at(250_000)), None);
        // A file stamped in the future: a second and the margin at most.
        assert_eq!(wait_before_replacing(at(900_000), at(100_000)), Some(second + margin));
    }

    /// The whole second of a file's modification time.
    fn mtime_second(path: &Path) -> u64 {
        fs::metadata(path).unwrap().modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    #[test]
    fn a_changed_manifest_lands_in_a_later_second_and_an_unchanged_one_is_left_alone() {
        let record = |id: &str, c: char, revoked: bool| {
            format!(r#"{{"id": "{id}", "hash": "{}", "org": "o", "revoked": {revoked}}}"#, c.to_string().repeat(64))
        };
        let set =
            |revoked: bool| format!(r#"{{"keys": [{}, {}]}}"#, record("a", 'a', revoked), record("b", 'b', false));
        let d = dir("seconds");
        let manifest = d.join("manifest.json");
        publish(set(false).as_bytes(), &d, 1, "1").unwrap();
        let first = (fs::read(&manifest).unwrap(), mtime_second(&manifest));
        let first_modified = fs::metadata(&manifest).unwrap().modified().unwrap();

        // The same set and version: nothing to write, and no wait.
        let started = std::time::Instant::now();
        publish(set(false).as_bytes(), &d, 1, "1").unwrap();
        assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
        assert_eq!(fs::read(&manifest).unwrap(), first.0);
        assert_eq!(fs::metadata(&manifest).unwrap().modified().unwrap(), first_modified, "rewritten");

        // A revocation at once, under the same version: as large a manifest, in a later second, so
        // an ETag made of the mtime in seconds and the size differs too.
        publish(set(true).as_bytes(), &d, 1, "1").unwrap();
        let second = (fs::read(&manifest).unwrap(), mtime_second(&manifest));
        assert_ne!(second.0, first.0);
        assert_eq!(second.0.len(), first.0.len());
        assert!(second.1 > first.1, "the manifest was written in second {} again", first.1);
        let _ = fs::remove_dir_all(&d);
    }
}
