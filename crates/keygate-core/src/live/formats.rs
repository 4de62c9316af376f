//! The key-set endpoint's documents: the manifest that lists the shards, and the shards that hold
//! the key records. Each is checked in full (shape, nesting, coverage of the prefixes, etags, each
//! key's hash against its shard's prefix) before anything of it is used.

use crate::error::ConfigError;
use crate::json::parse_json;
use crate::jsonpath::{path_at, too_deep, Reported};
use crate::keys::record::{parse_hash, KeyChecker, RawKey};
use crate::keys::{hash_key, Key, KeyHash};
use serde::Deserialize;
use std::collections::HashSet;

/// The deepest nesting a manifest or shard may have: a shard's `{"keys": [{"scopes": [...]}]}` is
/// four levels, so eight leave room and stop a parser long before its recursion limit.
pub const MAX_DEPTH: usize = 8;

/// One shard as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRef {
    pub prefix: String,
    pub path: String,
    /// SHA-256 of the shard document's bytes.
    pub etag: KeyHash,
}

/// A checked manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub version: String,
    pub shards: Vec<ShardRef>,
}

impl Manifest {
    /// The shards' prefix length.
    pub fn width(&self) -> usize {
        self.shards.first().map_or(0, |s| s.prefix.len())
    }
}

/// Every prefix of a shard layout `width` hex digits long.
pub fn prefixes(width: usize) -> impl Iterator<Item = String> {
    (0..1usize << (4 * width)).map(move |n| if width == 0 { String::new() } else { format!("{n:0width$x}") })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    version: RawVersion,
    shards: Vec<RawShardRef>,
}

#[derive(Debug)]
enum RawVersion {
    Number(u64),
    Text(String),
}

/// Read by type, not as an untagged enum, which would buffer any value (a megabyte of nested
/// arrays, say) before refusing it.
impl<'de> Deserialize<'de> for RawVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl serde::de::Visitor<'_> for Either {
            type Value = RawVersion;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string or a non-negative integer")
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawVersion, E> {
                Ok(RawVersion::Number(v))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawVersion, E> {
                Ok(RawVersion::Text(v.to_string()))
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShardRef {
    prefix: String,
    path: String,
    etag: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShard {
    keys: Vec<RawKey>,
}

/// Parses and checks a manifest: shard prefixes of one length covering every prefix once.
pub fn parse_manifest(body: &[u8]) -> Result<Manifest, ConfigError> {
    check_depth("manifest", body)?;
    let raw: RawManifest = parse_json(body).map_err(|e| within("manifest", e))?;
    let version = match raw.version {
        RawVersion::Number(n) => n.to_string(),
        RawVersion::Text(t) if !t.is_empty() && t.len() <= 128 && !t.chars().any(char::is_control) => t,
        RawVersion::Text(_) => return Err(ConfigError::new("manifest.version", "must be 1 to 128 characters")),
    };
    let width = raw.shards.first().map_or(0, |s| s.prefix.len());
    if width > 4 {
        return Err(ConfigError::new("manifest.shards[0].prefix", "prefixes are at most 4 hex digits"));
    }
    let expected = 1usize << (4 * width);
    if raw.shards.len() != expected {
        return Err(ConfigError::new(
            "manifest.shards",
            format!("{} shards with {width}-digit prefixes must be exactly {expected}", raw.shards.len()),
        ));
    }
    let mut seen = HashSet::with_capacity(expected);
    let mut shards = Vec::with_capacity(expected);
    for (i, s) in raw.shards.into_iter().enumerate() {
        let at = |f: &str| format!("manifest.shards[{i}].{f}");
        let prefix = s.prefix.to_ascii_lowercase();
        if prefix.len() != width || !prefix.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(ConfigError::new(at("prefix"), format!("expected {width} hex digits")));
        }
        if !seen.insert(prefix.clone()) {
            return Err(ConfigError::new(at("prefix"), format!("prefix {prefix:?} listed twice")));
        }
        if s.path.is_empty() || !s.path.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::new(at("path"), "must be a non-empty path"));
        }
        let etag = parse_hash(s.etag.trim_matches('"'))
            .map_err(|_| ConfigError::new(at("etag"), "expected the 64-hex-digit SHA-256 of the shard"))?;
        shards.push(ShardRef { prefix, path: s.path, etag });
    }
    Ok(Manifest { version, shards })
}

/// Checks a fetched shard against its manifest entry and compiles its keys.
pub fn parse_shard(shard: &ShardRef, body: &[u8]) -> Result<Vec<(KeyHash, Key)>, ConfigError> {
    let at = format!("shard {:?} ({})", shard.prefix, shard.path);
    if hash_key(body) != shard.etag {
        return Err(ConfigError::new(at, "content does not match its etag (SHA-256)"));
    }
    check_depth(&at, body)?;
    let raw: RawShard = parse_json(body).map_err(|e| within(&at, e))?;
    // In the document's order, so a shard always applies the same way.
    let mut checker = KeyChecker::new("keys", raw.keys.len());
    let mut keys = Vec::with_capacity(raw.keys.len());
    for (i, record) in raw.keys.iter().enumerate() {
        let (hash, key) = checker.check(record).map_err(|e| within(&at, e))?;
        if !record.hash.to_ascii_lowercase().starts_with(&shard.prefix) {
            return Err(ConfigError::new(
                format!("{at}: keys[{i}].hash"),
                format!("does not start with the shard's prefix {:?}", shard.prefix),
            ));
        }
        keys.push((hash, key));
    }
    Ok(keys)
}

/// Refuses a document nested deeper than [`MAX_DEPTH`], in one pass, before it is parsed.
fn check_depth(place: &str, body: &[u8]) -> Result<(), ConfigError> {
    match too_deep(body, MAX_DEPTH) {
        None => Ok(()),
        Some(at) => Err(within(
            place,
            ConfigError::new(path_at(body, at, Reported::Data), format!("nested more than {MAX_DEPTH} levels deep")),
        )),
    }
}

fn within(place: &str, mut e: ConfigError) -> ConfigError {
    e.field = if e.field.is_empty() { place.to_string() } else { format!("{place}: {}", e.field) };
    e
}
