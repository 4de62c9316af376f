//! The live key-set layout (README, "Key distribution"), written in one place: what
//! `keygate config --shards` publishes, what the integration tests' key-set server serves, and,
//! through the `keygate` command, what the benchmark serves.
//!
//! Records are sharded by the first `digits` hex digits (0 to [`MAX_DIGITS`]) of their lowercase
//! hash: `16^digits` shard documents `{"keys": [...]}`, one per prefix in prefix order, at
//! `shards/<prefix>.json` (`shards/all.json` for the one shard of `digits` 0), each record's JSON
//! placed as given and in the order given; and a manifest, `manifest.json`, holding a `version`
//! and listing every shard with its `prefix`, its `path` and its `etag`, the SHA-256 of its bytes
//! in hex. Paths are relative to the manifest's directory.
//!
//! This module only lays documents out; reading them back is [`crate::live`]'s job, and writing
//! files (shards first, the manifest last) is the caller's.

use crate::keys::hash_key;
use std::fmt;

/// The most hex digits of hash prefix a layout shards by (65 536 shards).
pub const MAX_DIGITS: usize = 4;

/// Where the manifest goes, relative to the directory the layout is served from.
pub const MANIFEST_PATH: &str = "manifest.json";

/// A key record to lay out: its hash (64 hex digits, either case) and its JSON text, which goes into
/// its shard exactly as given (one line reads best).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    pub hash: &'a str,
    pub json: &'a str,
}

/// One shard document of a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    /// `digits` lowercase hex digits, or empty for the one shard of `digits` 0.
    pub prefix: String,
    /// As the manifest lists it: [`shard_path`] of the prefix.
    pub path: String,
    /// The shard document's exact bytes.
    pub body: Vec<u8>,
    /// How many records it holds.
    pub keys: usize,
}

impl Shard {
    /// The manifest's `etag` of this shard: the SHA-256 of its bytes, lowercase hex.
    pub fn etag(&self) -> String {
        hex::encode(hash_key(&self.body))
    }
}

/// A key set laid out as shard documents and a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: String,
    /// Every prefix of the width, in prefix order.
    pub shards: Vec<Shard>,
}

/// Why records cannot be laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayoutError {
    /// More hex digits of prefix than [`MAX_DIGITS`].
    Digits(usize),
    /// Record `index`'s hash does not begin with `digits` hex digits, so no shard holds it.
    Hash { index: usize, digits: usize },
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::Digits(digits) => {
                write!(f, "shards by 0 to {MAX_DIGITS} hex digits of hash prefix, not {digits}")
            }
            LayoutError::Hash { index, digits } => {
                write!(f, "keys[{index}].hash: does not begin with {digits} hex digits, so no shard holds it")
            }
        }
    }
}

impl std::error::Error for LayoutError {}

impl Layout {
    /// Lays `records` out in `16^digits` shards; `version` names the publication.
    pub fn new(records: &[Record<'_>], digits: usize, version: &str) -> Result<Layout, LayoutError> {
        if digits > MAX_DIGITS {
            return Err(LayoutError::Digits(digits));
        }
        let count = 1usize << (4 * digits);
        let mut inside: Vec<Vec<&str>> = vec![Vec::new(); count];
        for (index, record) in records.iter().enumerate() {
            let slot = shard_index(record.hash, digits)
                .and_then(|n| inside.get_mut(n))
                .ok_or(LayoutError::Hash { index, digits })?;
            slot.push(record.json);
        }
        let shards = inside
            .iter()
            .enumerate()
            .map(|(n, lines)| {
                let prefix = if digits == 0 { String::new() } else { format!("{n:0digits$x}") };
                Shard { path: shard_path(&prefix), body: shard_document(lines), keys: lines.len(), prefix }
            })
            .collect();
        Ok(Layout { version: version.to_string(), shards })
    }

    /// The manifest document's bytes.
    pub fn manifest(&self) -> Vec<u8> {
        let etags: Vec<String> = self.shards.iter().map(Shard::etag).collect();
        let entries: Vec<Entry<'_>> =
            self.shards.iter().zip(&etags).map(|(s, etag)| Entry { prefix: &s.prefix, path: &s.path, etag }).collect();
        manifest_document(&self.version, &entries)
    }

    /// Every document as (path relative to the served directory, bytes): the shards in prefix
    /// order, then the manifest, which is the order to write them in.
    pub fn into_files(self) -> Vec<(String, Vec<u8>)> {
        let manifest = self.manifest();
        let mut files: Vec<(String, Vec<u8>)> = self.shards.into_iter().map(|s| (s.path, s.body)).collect();
        files.push((MANIFEST_PATH.to_string(), manifest));
        files
    }

    /// How many records the shards hold.
    pub fn keys(&self) -> usize {
        self.shards.iter().map(|s| s.keys).sum()
    }
}

/// Which of the `16^digits` shards holds `hash`: its first `digits` hex digits as a number.
fn shard_index(hash: &str, digits: usize) -> Option<usize> {
    let head = hash.as_bytes().get(..digits)?;
    head.iter().try_fold(0usize, |n, &c| Some(n * 16 + usize::try_from(char::from(c).to_digit(16)?).ok()?))
}

/// The path of the shard with `prefix`: `shards/<prefix>.json`, or `shards/all.json` for `""`.
pub fn shard_path(prefix: &str) -> String {
    let name = if prefix.is_empty() { "all" } else { prefix };
    format!("shards/{name}.json")
}

/// A shard document holding `records` (JSON texts, placed as given): `{"keys": [...]}`, one record
/// a line.
pub fn shard_document(records: &[&str]) -> Vec<u8> {
    if records.is_empty() {
        return b"{\"keys\": []}\n".to_vec();
    }
    format!("{{\"keys\": [\n  {}\n]}}\n", records.join(",\n  ")).into_bytes()
}

/// One shard as the manifest lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry<'a> {
    pub prefix: &'a str,
    pub path: &'a str,
    /// The SHA-256 of the shard's bytes, hex (see [`Shard::etag`]).
    pub etag: &'a str,
}

/// A manifest document: `version` and the shards `entries` lists, one a line.
pub fn manifest_document(version: &str, entries: &[Entry<'_>]) -> Vec<u8> {
    let lines: Vec<String> = entries
        .iter()
        .map(|e| {
            format!("{{\"prefix\": {}, \"path\": {}, \"etag\": {}}}", string(e.prefix), string(e.path), string(e.etag))
        })
        .collect();
    let shards = if lines.is_empty() { "[]".to_string() } else { format!("[\n  {}\n]", lines.join(",\n  ")) };
    format!("{{\"version\": {},\n \"shards\": {shards}}}\n", string(version)).into_bytes()
}

/// `text` as a JSON string.
fn string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(hash: &str, id: &str) -> (String, String) {
        (hash.to_string(), format!(r#"{{"id": "{id}", "hash": "{hash}", "org": "o"}}"#))
    }

    fn records(list: &[(String, String)]) -> Vec<Record<'_>> {
        list.iter().map(|(hash, json)| Record { hash, json }).collect()
    }

    #[test]
    fn records_go_to_the_shard_of_their_lowercase_prefix_in_the_order_given() {
        let list = [rec(&"0".repeat(64), "a"), rec(&"F".repeat(64), "b"), rec(&format!("0{}", "f".repeat(63)), "c")];
        let layout = Layout::new(&records(&list), 1, "7").unwrap();
        assert_eq!(layout.shards.len(), 16);
        assert_eq!(layout.keys(), 3);
        let zero = &layout.shards[0];
        assert_eq!((zero.prefix.as_str(), zero.path.as_str(), zero.keys), ("0", "shards/0.json", 2));
        assert_eq!(
            String::from_utf8(zero.body.clone()).unwrap(),
            format!("{{\"keys\": [\n  {},\n  {}\n]}}\n", list[0].1, list[2].1)
        );
        assert_eq!(layout.shards[15].body, shard_document(&[&list[1].1]));
        assert_eq!(layout.shards[1].body, b"{\"keys\": []}\n");
    }

    #[test]
    fn the_manifest_lists_every_shard_with_the_sha256_of_its_bytes() {
        let list = [rec(&"a".repeat(64), "a")];
        let layout = Layout::new(&records(&list), 0, "v \"1\"").unwrap();
        let etag = hex::encode(hash_key(&layout.shards[0].body));
        let want = format!(
            "{{\"version\": \"v \\\"1\\\"\",\n \"shards\": [\n  {{\"prefix\": \"\", \"path\": \"shards/all.json\", \"etag\": \"{etag}\"}}\n]}}\n"
        );
        assert_eq!(String::from_utf8(layout.manifest()).unwrap(), want);
        let manifest = layout.manifest();
        let files = layout.into_files();
        let paths: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(paths, ["shards/all.json", "manifest.json"]);
        assert_eq!(files[1].1, manifest);
    }

    #[test]
    fn prefixes_have_every_width_up_to_four_digits() {
        let layout = Layout::new(&[], 2, "1").unwrap();
        assert_eq!(layout.shards.len(), 256);
        assert_eq!(layout.shards[0x3c].path, "shards/3c.json");
        assert_eq!(Layout::new(&[], 4, "1").unwrap().shards.len(), 65_536);
        assert_eq!(Layout::new(&[], 5, "1"), Err(LayoutError::Digits(5)));
    }

    #[test]
    fn what_it_lays_out_loads_with_the_filters_manifest_and_shard_checks() {
        let list: Vec<(String, String)> =
            (0..40u8).map(|i| rec(&hex::encode(hash_key(&[i])), &format!("k{i}"))).collect();
        for digits in 0..=2 {
            let layout = Layout::new(&records(&list), digits, "1732355000").unwrap();
            let manifest = crate::live::parse_manifest(&layout.manifest()).unwrap();
            assert_eq!(manifest.version, "1732355000");
            let mut ids = Vec::new();
            for (listed, shard) in manifest.shards.iter().zip(&layout.shards) {
                assert_eq!(
                    (listed.prefix.as_str(), listed.path.as_str()),
                    (shard.prefix.as_str(), shard.path.as_str())
                );
                ids.extend(crate::live::parse_shard(listed, &shard.body).unwrap().into_iter().map(|(_, k)| k.id));
            }
            assert_eq!(manifest.shards.len(), layout.shards.len());
            ids.sort();
            let mut want: Vec<String> = (0..40).map(|i| format!("k{i}")).collect();
            want.sort();
            assert_eq!(ids, want, "digits {digits}");
        }
    }

    #[test]
    fn a_hash_without_hex_digits_for_its_prefix_has_no_shard() {
        let list = [rec(&"0".repeat(64), "a"), rec("x", "b")];
        assert_eq!(Layout::new(&records(&list), 1, "1"), Err(LayoutError::Hash { index: 1, digits: 1 }));
        assert!(Layout::new(&records(&list), 0, "1").is_ok());
        let short = [rec("a", "c")];
        assert_eq!(Layout::new(&records(&short), 2, "1"), Err(LayoutError::Hash { index: 0, digits: 2 }));
    }
}
