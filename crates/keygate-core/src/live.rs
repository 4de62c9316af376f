//! Live key sets, kept in proxy-wasm shared data and fed from a key-set endpoint.
//!
//! Everything here is host-free: the `key_set` settings, the manifest and shard formats and their
//! checks, how a key record is stored in shared data, what one sync writes, and the lease that lets
//! one VM per Envoy process do the polling. Each host performs the host calls (the proxy-wasm filter: `keygate-wasm`).
//!
//! Shared-data layout, under `keygate/<ns>/` where `<ns>` names the endpoint (so two key sets in one
//! Envoy never mix):
//!
//! | entry | value |
//! |---|---|
//! | `k<ns><hash, base64url>` (no `keygate/` prefix: there may be millions) | one key record ([`encode_key`](crate::keys::stored::encode_key)), or a one-byte tombstone for a removed key |
//! | `shard/<prefix>` | the shard's etag, and the hash and id digest of each record it holds ([`ShardIndex`]) |
//! | `widths` | every shard width whose indexes may hold records, so that no record outlives a layout change ([`WIDTHS`]) |
//! | `state` | what has loaded: version, key count, time of the last good sync ([`SyncState`]) |
//! | `generation` | changes whenever a sync changes records (VMs drop the records they decoded) |
//! | `lease` | which VM polls, until when, when the next poll is due, failures in a row, on the monotonic clock ([`Lease`]) |
//! | `vmseq` | counts the VMs numbered; the compare-and-swap token each VM consumed writing it is its number ([`number_vm`]) |

use crate::error::ConfigError;
use crate::json::parse_json;
use crate::jsonpath::{path_at, too_deep, Reported};
use crate::keys::record::{parse_hash, KeyChecker, RawKey};
use crate::keys::stored::{decode_key, encode_key, TOMBSTONE};
use crate::keys::{hash_key, Key, KeyHash, KeySet};
use serde::Deserialize;
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

/// The compiled `key_set` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySetConfig {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub poll_interval_ms: u64,
    pub timeout_ms: u64,
    /// Largest manifest body read; a bigger one fails the sync before it is read.
    pub max_manifest_bytes: usize,
    /// Largest shard body read.
    pub max_shard_bytes: usize,
    /// Names this endpoint in shared-data entries.
    pub namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeySet {
    pub cluster: String,
    pub authority: Option<String>,
    pub path: String,
    pub poll_interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_manifest_bytes: Option<u64>,
    pub max_shard_bytes: Option<u64>,
}

/// The version of the shared-data layout below.
const LAYOUT: u32 = 3;

/// `max_manifest_bytes` by default: 1 MiB holds a manifest of 4 096 shards (about 130 bytes each).
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// `max_shard_bytes` by default: 64 MiB holds a 16th of a million keys of 1 KiB records.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 64 << 20;
const MANIFEST_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(64 << 20);
const SHARD_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 30);

/// The deepest nesting a manifest or shard may have: a shard's `{"keys": [{"scopes": [...]}]}` is
/// four levels, so eight leave room and stop a parser long before its recursion limit.
pub const MAX_DEPTH: usize = 8;

/// Most shard fetches in flight at once during one sync.
pub const MAX_IN_FLIGHT: usize = 4;

const MAX_BACKOFF_MS: u64 = 30_000;

impl KeySetConfig {
    pub fn compile(raw: &RawKeySet) -> Result<Self, ConfigError> {
        let text_ok = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_graphic());
        if !text_ok(&raw.cluster) {
            return Err(ConfigError::new("key_set.cluster", "must name an Envoy cluster"));
        }
        if !raw.path.starts_with('/') || !text_ok(&raw.path) {
            return Err(ConfigError::new("key_set.path", "must be a path starting with '/'"));
        }
        let authority = raw.authority.clone().unwrap_or_else(|| raw.cluster.clone());
        if !text_ok(&authority) {
            return Err(ConfigError::new("key_set.authority", "must be a host name"));
        }
        let poll_interval_ms = raw.poll_interval_ms.unwrap_or(2_000);
        if !(100..=3_600_000).contains(&poll_interval_ms) {
            return Err(ConfigError::new("key_set.poll_interval_ms", "must be between 100 and 3600000"));
        }
        let timeout_ms = raw.timeout_ms.unwrap_or(1_000);
        if !(10..=60_000).contains(&timeout_ms) {
            return Err(ConfigError::new("key_set.timeout_ms", "must be between 10 and 60000"));
        }
        let bytes = |value: Option<u64>, default: u64, range: std::ops::RangeInclusive<u64>, field: &str| {
            let n = value.unwrap_or(default);
            if !range.contains(&n) {
                let message = format!("must be between {} and {}", range.start(), range.end());
                return Err(ConfigError::new(format!("key_set.{field}"), message));
            }
            usize::try_from(n).map_err(|_| ConfigError::new(format!("key_set.{field}"), "too large for this platform"))
        };
        let max_manifest_bytes =
            bytes(raw.max_manifest_bytes, DEFAULT_MAX_MANIFEST_BYTES, MANIFEST_BYTES_RANGE, "max_manifest_bytes")?;
        let max_shard_bytes =
            bytes(raw.max_shard_bytes, DEFAULT_MAX_SHARD_BYTES, SHARD_BYTES_RANGE, "max_shard_bytes")?;
        // The layout version is part of the namespace: an upgraded filter whose layout differs loads
        // a fresh copy instead of misreading the old one.
        let id = format!("{LAYOUT}\n{}\n{}\n{}", raw.cluster, authority, raw.path);
        let namespace = hex::encode(hash_key(id.as_bytes()).get(..4).unwrap_or_default());
        Ok(KeySetConfig {
            cluster: raw.cluster.clone(),
            authority,
            path: raw.path.clone(),
            poll_interval_ms,
            timeout_ms,
            max_manifest_bytes,
            max_shard_bytes,
            namespace,
        })
    }

    /// Why a body of `size` bytes is not read, when it is larger than its limit.
    pub fn refuse_body(&self, what: Fetched, size: usize) -> Option<String> {
        let (limit, field, name) = match what {
            Fetched::Manifest => (self.max_manifest_bytes, "max_manifest_bytes", "manifest".to_string()),
            Fetched::Shard(prefix) => (self.max_shard_bytes, "max_shard_bytes", format!("shard {prefix:?}")),
        };
        (size > limit).then(|| format!("{name}: the body is {size} bytes, more than key_set.{field} ({limit})"))
    }

    /// The entry of one key's record: short (52 characters), as there may be millions.
    pub fn key_entry(&self, hash: &KeyHash) -> String {
        let mut entry = String::with_capacity(52);
        entry.push('k');
        entry.push_str(&self.namespace);
        push_base64url(hash, &mut entry);
        entry
    }

    pub fn shard_entry(&self, prefix: &str) -> String {
        format!("keygate/{}/shard/{prefix}", self.namespace)
    }

    pub fn state_entry(&self) -> String {
        format!("keygate/{}/state", self.namespace)
    }

    /// Changes whenever the polling VM changes records: VMs keeping decoded records drop them.
    pub fn generation_entry(&self) -> String {
        format!("keygate/{}/generation", self.namespace)
    }

    pub fn lease_entry(&self) -> String {
        format!("keygate/{}/lease", self.namespace)
    }

    pub fn widths_entry(&self) -> String {
        format!("keygate/{}/{WIDTHS}", self.namespace)
    }

    pub fn vmseq_entry(&self) -> String {
        format!("keygate/{}/vmseq", self.namespace)
    }

    /// How often every VM wakes: to renew or take the lease, start a poll that is due, and refresh
    /// the gauges. A fifth of the poll interval (100 ms to 1 s), so a poll starts at most that late.
    pub fn tick_ms(&self) -> u64 {
        (self.poll_interval_ms / 5).clamp(100, 1_000)
    }

    /// How long a lease lasts without renewal: three poll intervals, at least 3 s.
    pub fn lease_ttl_ms(&self) -> i64 {
        i64::try_from(self.poll_interval_ms.saturating_mul(3).max(3_000)).unwrap_or(i64::MAX)
    }

    /// The wait before the next attempt after `failures` failed syncs in a row: doubling from the
    /// poll interval, at most ten times it and at most 30 s.
    pub fn retry_after_ms(&self, failures: u32) -> u64 {
        if failures == 0 {
            return self.poll_interval_ms;
        }
        let cap = self.poll_interval_ms.saturating_mul(10).min(MAX_BACKOFF_MS).max(self.poll_interval_ms);
        self.poll_interval_ms.saturating_mul(1u64 << failures.min(20)).min(cap)
    }

    /// The longest wait between two syncs: the backoff's cap.
    pub fn max_wait_ms(&self) -> u64 {
        self.retry_after_ms(u32::MAX)
    }

    /// The request path of a shard: absolute, or relative to the manifest's directory.
    pub fn shard_request_path(&self, shard_path: &str) -> String {
        if shard_path.starts_with('/') {
            return shard_path.to_string();
        }
        let dir = self.path.rsplit_once('/').map_or("", |(dir, _)| dir);
        format!("{dir}/{shard_path}")
    }
}

/// One shard as the manifest lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRef {
    pub prefix: String,
    pub path: String,
    /// SHA-256 of the shard document's bytes.
    pub etag: KeyHash,
}

/// What an answer of the key-set endpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched<'a> {
    Manifest,
    /// The shard with this prefix.
    Shard(&'a str),
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

/// What a sync that changes the shard layout leaves behind: the index entries of every other layout
/// that may hold records ([`stale_widths`]) and every hash they held.
#[derive(Debug, Default)]
pub struct Retired {
    pub prefixes: Vec<String>,
    pub hashes: Vec<KeyHash>,
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

/// What a shard entry in shared data remembers: the etag loaded, and the hashes written for it with
/// the digest of each record's id ([`id_digest`]), in the shard's document order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ShardIndex {
    pub etag: KeyHash,
    pub hashes: Vec<KeyHash>,
    /// `ids[i]` is the id digest of `hashes[i]`'s record.
    pub ids: Vec<u32>,
}

/// The etag of an index written before its shard's records, listing old and new ones: it matches
/// no shard, so the shard is fetched again if the write stops there.
pub const PENDING_ETAG: KeyHash = [0; 32];

impl ShardIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + 36 * self.hashes.len());
        out.extend_from_slice(&self.etag);
        for (h, id) in self.hashes.iter().zip(&self.ids) {
            out.extend_from_slice(h);
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let (etag, rest) = bytes.split_first_chunk::<32>()?;
        if rest.len() % 36 != 0 {
            return None;
        }
        let mut index = ShardIndex { etag: *etag, hashes: Vec::with_capacity(rest.len() / 36), ids: Vec::new() };
        index.ids.reserve(rest.len() / 36);
        for entry in rest.chunks_exact(36) {
            let (hash, id) = entry.split_first_chunk::<32>()?;
            index.hashes.push(*hash);
            index.ids.push(u32::from_le_bytes(id.try_into().ok()?));
        }
        Some(index)
    }
}

/// A 4-byte digest of a record's id, kept in shard indexes so that a sync finds an id loaded in
/// another shard without reading its records. Digests collide; a match is confirmed on the record.
pub fn id_digest(id: &str) -> u32 {
    let hash = hash_key(id.as_bytes());
    u32::from_le_bytes(*hash.first_chunk::<4>().unwrap_or(&[0; 4]))
}

/// Where an id seen by a sync stands: a shard, by its prefix read as a number, or [`INLINE`].
pub const INLINE: u32 = u32::MAX;

/// The prefix of shard number `n` of a layout `width` digits wide (the inverse of [`shard_number`]).
pub fn prefix_of(n: u32, width: usize) -> String {
    if width == 0 {
        String::new()
    } else {
        format!("{n:0width$x}")
    }
}

/// A prefix read as a hexadecimal number (`""` is 0).
pub fn shard_number(prefix: &str) -> u32 {
    u32::from_str_radix(prefix, 16).unwrap_or(0)
}

/// Where an id stands when its digest is held by more than one place (digests collide): anywhere.
pub const SEVERAL: u32 = u32::MAX - 1;

/// The digests of the inline keys' ids.
pub fn inline_ids(inline: &KeySet) -> HashSet<u32> {
    inline.keys().map(|k| id_digest(&k.id)).collect()
}

/// The ids of the set a sync is building, by digest, with the place that holds each: the inline
/// keys, the shards the sync keeps, and each shard it fetched once checked. A digest and a place an
/// id (about 20 MB in the polling VM at 1M keys, for the sync only), rather than the ids themselves.
#[derive(Debug, Default)]
pub struct IdIndex {
    inline: Rc<HashSet<u32>>,
    shards: HashMap<u32, u32>,
}

impl IdIndex {
    pub fn new(inline: Rc<HashSet<u32>>) -> Self {
        IdIndex { inline, shards: HashMap::new() }
    }

    /// Adds the id digests of shard number `place`.
    pub fn add(&mut self, place: u32, ids: impl IntoIterator<Item = u32>) {
        for id in ids {
            match self.shards.entry(id) {
                Entry::Vacant(v) => {
                    v.insert(place);
                }
                Entry::Occupied(mut o) if *o.get() != place => {
                    o.insert(SEVERAL);
                }
                Entry::Occupied(_) => {}
            }
        }
    }

    /// Refuses the first record of `shard` whose id another place holds. `place_of(place, digest,
    /// id)` confirms a digest's match on that place's records ([`INLINE`], a shard number, or
    /// [`SEVERAL`]: every shard) and names where the id stands there.
    pub fn check(
        &self,
        shard: &ShardRef,
        keys: &[(KeyHash, Key)],
        place_of: impl Fn(u32, u32, &str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        for (i, (_, key)) in keys.iter().enumerate() {
            let digest = id_digest(&key.id);
            let inline = self.inline.contains(&digest).then_some(INLINE);
            let places = inline.into_iter().chain(self.shards.get(&digest).copied());
            if let Some(there) = places.filter_map(|place| place_of(place, digest, &key.id)).next() {
                return Err(ConfigError::new(
                    format!("shard {:?} ({}): keys[{i}].id", shard.prefix, shard.path),
                    format!("{:?} is also {there}", key.id),
                ));
            }
        }
        Ok(())
    }
}

/// Where `id` stands among the inline keys, if it does.
pub fn inline_place(inline: &KeySet, id: &str) -> Option<String> {
    inline.keys().any(|k| k.id == id).then(|| "the id of an inline key (the configuration's `keys`)".to_string())
}

/// The position in shard `prefix`, as stored, of the record with id `id` (whose digest is `digest`).
pub fn stored_position(config: &KeySetConfig, store: &dyn Store, prefix: &str, digest: u32, id: &str) -> Option<usize> {
    let (bytes, _) = store.get(&config.shard_entry(prefix)).ok()??;
    let index = ShardIndex::decode(&bytes)?;
    index.ids.iter().zip(&index.hashes).position(|(d, hash)| {
        *d == digest
            && store
                .get(&config.key_entry(hash))
                .ok()
                .flatten()
                .and_then(|(record, _)| decode_key(&record))
                .is_some_and(|k| k.id == id)
    })
}

/// The entry listing the shard widths whose indexes may hold records, as a bit mask.
pub const WIDTHS: &str = "widths";

/// The bit of a shard width in the `widths` mask.
pub fn width_bit(width: usize) -> u8 {
    1u8.checked_shl(u32::try_from(width).unwrap_or(8)).unwrap_or(0)
}

pub fn decode_widths(bytes: &[u8]) -> u8 {
    std::str::from_utf8(bytes).ok().and_then(|t| t.parse().ok()).unwrap_or(0)
}

/// The widths other than `width` whose indexes may still hold records: those in the `widths` mask,
/// and the loaded set's own.
pub fn stale_widths(mask: u8, loaded: Option<usize>, width: usize) -> Vec<usize> {
    (0..=4).filter(|&w| w != width && (mask & width_bit(w) != 0 || loaded == Some(w))).collect()
}

/// What has loaded, shared by every VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncState {
    pub version: String,
    pub keys: u64,
    /// Monotonic milliseconds (Envoy's steady clock) of the last good sync.
    pub synced_ms: i64,
    /// The manifest's `ETag` header, for `If-None-Match`.
    pub manifest_etag: Option<String>,
    /// The shards' prefix length: a manifest with another one replaces the whole set.
    pub width: Option<usize>,
}

impl SyncState {
    /// One field a line: version, keys, synced_ms, width (or `-`), manifest ETag (or nothing). The
    /// version has no control characters (the manifest check) and an ETag header no line break.
    pub fn encode(&self) -> Vec<u8> {
        let width = self.width.map_or_else(|| "-".to_string(), |w| w.to_string());
        let etag = self.manifest_etag.as_deref().unwrap_or_default();
        format!("{}\n{}\n{}\n{width}\n{etag}", self.version, self.keys, self.synced_ms).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.splitn(5, '\n');
        let version = lines.next()?.to_string();
        let keys = lines.next()?.parse().ok()?;
        let synced_ms = lines.next()?.parse().ok()?;
        let width = match lines.next()? {
            "-" => None,
            w => Some(w.parse().ok()?),
        };
        let etag = lines.next()?;
        let manifest_etag = (!etag.is_empty()).then(|| etag.to_string());
        Some(SyncState { version, keys, synced_ms, manifest_etag, width })
    }

    /// The version as a number, for the version gauge, when it is all digits.
    pub fn version_number(&self) -> Option<u64> {
        self.version.parse().ok()
    }
}

/// A shard fetched and checked in this sync, in the form it is stored in (compact, so a large first
/// load holds no decoded records), with what shared data held for it before.
#[derive(Debug)]
pub struct FetchedShard {
    pub shard: ShardRef,
    pub records: Vec<(KeyHash, Vec<u8>)>,
    /// The id digest of each record.
    pub ids: Vec<u32>,
    pub previous: Option<ShardIndex>,
}

impl FetchedShard {
    /// Encodes a checked shard's keys, refusing any whose hash is also an inline key.
    pub fn new(
        shard: ShardRef,
        keys: Vec<(KeyHash, Key)>,
        previous: Option<ShardIndex>,
        inline: &KeySet,
    ) -> Result<Self, ConfigError> {
        if let Some((_, key)) = keys.iter().find(|(hash, _)| inline.contains(hash)) {
            return Err(ConfigError::new(
                format!("shard {:?}: key {:?}", shard.prefix, key.id),
                "its hash is also an inline key in `keys`",
            ));
        }
        let ids = keys.iter().map(|(_, key)| id_digest(&key.id)).collect();
        let records = keys.into_iter().map(|(hash, key)| (hash, encode_key(&key))).collect();
        Ok(FetchedShard { shard, records, ids, previous })
    }

    /// The position of the record with id `id` (whose digest is `digest`).
    pub fn position_of(&self, digest: u32, id: &str) -> Option<usize> {
        self.ids
            .iter()
            .zip(&self.records)
            .position(|(d, (_, record))| *d == digest && decode_key(record).is_some_and(|k| k.id == id))
    }
}

/// Writes one shared-data entry (entry, value); the host's write in the filter, a list in tests.
pub type Write<'a> = dyn FnMut(&str, &[u8]) -> Result<(), String> + 'a;

/// Writes one fetched shard through `write` (entry, value): its records, tombstones for the keys gone
/// from it, then its index. Stops at the first failed write. When it adds records, an index listing
/// the old ones and the new ones is written first ([`PENDING_ETAG`]): whatever stops a sync, every
/// record in shared data is listed by some index, so a later set that lacks it retires it.
pub fn apply_shard(config: &KeySetConfig, f: &FetchedShard, write: &mut Write) -> Result<(), String> {
    let (old, old_ids) = f.previous.as_ref().map(|p| (p.hashes.as_slice(), p.ids.as_slice())).unwrap_or_default();
    let before: HashSet<&KeyHash> = old.iter().collect();
    if f.records.iter().any(|(h, _)| !before.contains(h)) {
        let mut pending = ShardIndex { etag: PENDING_ETAG, hashes: old.to_vec(), ids: old_ids.to_vec() };
        for ((hash, _), id) in f.records.iter().zip(&f.ids).filter(|((h, _), _)| !before.contains(h)) {
            pending.hashes.push(*hash);
            pending.ids.push(*id);
        }
        write(&config.shard_entry(&f.shard.prefix), &pending.encode())?;
    }
    for (hash, record) in &f.records {
        write(&config.key_entry(hash), record)?;
    }
    let now: HashSet<&KeyHash> = f.records.iter().map(|(h, _)| h).collect();
    for gone in old.iter().filter(|h| !now.contains(h)) {
        write(&config.key_entry(gone), TOMBSTONE)?;
    }
    let hashes = f.records.iter().map(|(h, _)| *h).collect();
    let index = ShardIndex { etag: f.shard.etag, hashes, ids: f.ids.clone() };
    write(&config.shard_entry(&f.shard.prefix), &index.encode())
}

/// Retires what older layouts left (`retired`): a tombstone for each of their hashes not `kept` by
/// the new set, their indexes voided, and `widths` reduced to the new `width`.
pub fn retire(
    config: &KeySetConfig,
    retired: &Retired,
    kept: &HashSet<&KeyHash>,
    width: usize,
    write: &mut Write,
) -> Result<(), String> {
    for gone in retired.hashes.iter().filter(|h| !kept.contains(h)) {
        write(&config.key_entry(gone), TOMBSTONE)?;
    }
    for prefix in &retired.prefixes {
        // An index that decodes as nothing: a later return to this layout fetches every shard.
        write(&config.shard_entry(prefix), TOMBSTONE)?;
    }
    write(&config.widths_entry(), width_bit(width).to_string().as_bytes())
}

/// Applies one sync through `write`: every fetched shard ([`apply_shard`]); with `retired` (the shard
/// layout changed, and every shard was fetched), tombstones for every hash of the old layout that is
/// not in the new one and voided old indexes; and last the state, which marks the set loaded.
#[allow(clippy::too_many_arguments)] // one sync's inputs, all needed; a struct would only rename them
pub fn apply_sync(
    config: &KeySetConfig,
    manifest: &Manifest,
    fetched: &[FetchedShard],
    retired: Option<&Retired>,
    previous: &SyncState,
    manifest_etag: Option<String>,
    now_ms: i64,
    write: &mut Write,
) -> Result<(), String> {
    let mut keys = if retired.is_some() { 0 } else { previous.keys };
    for f in fetched {
        apply_shard(config, f, write)?;
        let replaced = if retired.is_some() { 0 } else { f.previous.as_ref().map_or(0, |p| p.hashes.len() as u64) };
        keys = keys.saturating_sub(replaced).saturating_add(f.records.len() as u64);
    }
    if let Some(retired) = retired {
        let kept: HashSet<&KeyHash> = fetched.iter().flat_map(|f| f.records.iter().map(|(h, _)| h)).collect();
        retire(config, retired, &kept, manifest.width(), write)?;
    }
    write_state(config, manifest, keys, manifest_etag, now_ms, write)
}

/// Writes the state that marks `manifest`'s set loaded, holding `keys` keys.
pub fn write_state(
    config: &KeySetConfig,
    manifest: &Manifest,
    keys: u64,
    manifest_etag: Option<String>,
    now_ms: i64,
    write: &mut Write,
) -> Result<(), String> {
    let state = SyncState {
        version: manifest.version.clone(),
        keys,
        synced_ms: now_ms,
        manifest_etag,
        width: Some(manifest.width()),
    };
    write(&config.state_entry(), &state.encode())
}

fn push_base64url(bytes: &[u8], out: &mut String) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let sextet = |v: u32, shift: u32| char::from(ALPHABET.get(((v >> shift) & 63) as usize).copied().unwrap_or(b'A'));
    for chunk in bytes.chunks(3) {
        let b = |i: usize| u32::from(chunk.get(i).copied().unwrap_or(0));
        let v = (b(0) << 16) | (b(1) << 8) | b(2);
        out.push(sextet(v, 18));
        out.push(sextet(v, 12));
        if chunk.len() > 1 {
            out.push(sextet(v, 6));
        }
        if chunk.len() > 2 {
            out.push(sextet(v, 0));
        }
    }
}

/// Shared data as the sync uses it: the host's in the filter, a map in tests. Envoy's semantics: a
/// write without `cas`, or to an absent entry, always succeeds; every write gives the entry a new
/// token from one counter of the process, so no two writes ever leave the same token.
pub trait Store {
    /// The value and compare-and-swap token of `entry`; `None` while it is absent.
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, String>;
    /// Writes `entry`; with `cas`, only while its token is still `cas`: `Ok(false)` when another
    /// write came first.
    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String>;
}

/// How many times a compare-and-swap is retried against other VMs' writes before giving up.
const CAS_TRIES: usize = 100;

/// Gives this VM a number no other VM of the process has: the token of the `vmseq` entry as read
/// just before this VM's compare-and-swap write of it succeeded. A token is consumed by at most one
/// successful compare-and-swap (the write replaces it), so two VMs never get the same one, even
/// when two of them create the entry at once: shared data has no create-if-absent, and a create
/// that lands after another VM's increment only changes the entry's token.
pub fn number_vm(store: &dyn Store, config: &KeySetConfig) -> Result<u32, String> {
    let entry = config.vmseq_entry();
    for _ in 0..CAS_TRIES {
        match store.get(&entry)? {
            None => {
                store.set(&entry, b"0", None)?;
            }
            Some((value, cas)) => {
                // The count of VMs numbered, for the curious reader of shared data.
                let count: u64 = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                if store.set(&entry, count.saturating_add(1).to_string().as_bytes(), Some(cas))? {
                    return Ok(cas);
                }
            }
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}

/// Takes or renews the polling lease for VM `me` at monotonic time `now`; returns it when this VM
/// holds it. An absent lease is created (unconditionally: shared data has no create-if-absent) and
/// first claimed on the next tick, with compare-and-swap, so a VM creating it at the same moment
/// cannot overwrite a claim.
pub fn hold_lease(store: &dyn Store, config: &KeySetConfig, me: u32, now: i64) -> Result<Option<Lease>, String> {
    let entry = config.lease_entry();
    let Some((value, cas)) = store.get(&entry)? else {
        store.set(&entry, &Lease { owner: 0, expires_ms: 0, next_due_ms: 0, failures: 0 }.encode(), None)?;
        return Ok(None);
    };
    let Some(claimed) = Lease::claim(Lease::decode(&value), me, now, config.lease_ttl_ms()) else { return Ok(None) };
    Ok(store.set(&entry, &claimed.encode(), Some(cas))?.then_some(claimed))
}

/// Changes the lease with compare-and-swap, whichever VM holds it now: a sync's outcome counts
/// even when the lease moved while it ran (the failure count of the backoff must survive a move).
pub fn update_lease(
    store: &dyn Store,
    config: &KeySetConfig,
    change: impl Fn(Lease) -> Lease,
) -> Result<Lease, String> {
    let entry = config.lease_entry();
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get(&entry)? else { return Err(format!("{entry} is absent")) };
        let lease = Lease::decode(&value).ok_or_else(|| format!("{entry} is malformed"))?;
        let changed = change(lease);
        if store.set(&entry, &changed.encode(), Some(cas))? {
            return Ok(changed);
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}

/// Whole seconds from `since` to `now` (monotonic milliseconds), never negative.
pub fn seconds_since(since: i64, now: i64) -> u64 {
    u64::try_from(now.saturating_sub(since).max(0) / 1_000).unwrap_or(0)
}

/// The polling lease, stored as `owner,expires_ms,next_due_ms,failures`. Its times are monotonic
/// milliseconds (Envoy's steady clock, one for the whole process), so a step of the wall clock
/// moves no poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u32,
    pub expires_ms: i64,
    /// When the next sync is due (kept across a change of holder, so polls keep their pace).
    pub next_due_ms: i64,
    /// Failed syncs in a row, for the backoff.
    pub failures: u32,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        format!("{},{},{},{}", self.owner, self.expires_ms, self.next_due_ms, self.failures).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(',');
        let lease = Lease {
            owner: parts.next()?.parse().ok()?,
            expires_ms: parts.next()?.parse().ok()?,
            next_due_ms: parts.next()?.parse().ok()?,
            failures: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(lease)
    }

    /// What VM `me` writes (with compare-and-swap) to hold the lease from `now_ms`, or `None` while
    /// another VM holds an unexpired one. A lease said to last longer than `ttl_ms` from now was
    /// written against another clock (shared data forged, or a clock that stepped back), and counts
    /// as expired.
    pub fn claim(current: Option<Lease>, me: u32, now_ms: i64, ttl_ms: i64) -> Option<Lease> {
        match current {
            Some(l) if l.owner != me && l.expires_ms > now_ms && l.expires_ms <= now_ms.saturating_add(ttl_ms) => None,
            Some(l) => Some(Lease { owner: me, expires_ms: now_ms + ttl_ms, ..l }),
            None => Some(Lease { owner: me, expires_ms: now_ms + ttl_ms, next_due_ms: now_ms, failures: 0 }),
        }
    }

    /// Whether a sync is due at `now`. A due time further ahead than the longest wait ever
    /// scheduled ([`KeySetConfig::max_wait_ms`]) was set against another clock, and is due now.
    pub fn due(&self, now: i64, config: &KeySetConfig) -> bool {
        let longest = i64::try_from(config.max_wait_ms()).unwrap_or(i64::MAX);
        now >= self.next_due_ms || self.next_due_ms.saturating_sub(now) > longest
    }

    /// The lease after a sync that failed at `now`: one more failure, and the backoff's wait.
    pub fn after_failure(self, now: i64, config: &KeySetConfig) -> Lease {
        let failures = self.failures.saturating_add(1);
        let wait = i64::try_from(config.retry_after_ms(failures)).unwrap_or(i64::MAX);
        Lease { next_due_ms: now.saturating_add(wait), failures, ..self }
    }

    /// The lease after a good sync at `now`: no failures, the next poll one interval on.
    pub fn after_success(self, now: i64, config: &KeySetConfig) -> Lease {
        let wait = i64::try_from(config.poll_interval_ms).unwrap_or(i64::MAX);
        Lease { next_due_ms: now.saturating_add(wait), failures: 0, ..self }
    }
}

#[cfg(test)]
#[path = "live_tests.rs"]
mod tests;
