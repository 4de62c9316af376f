//! Shared data as the key set keeps it: the store a host provides ([`Store`], with Envoy's
//! compare-and-swap semantics), and what the entries of the layout hold: each shard's index
//! ([`ShardIndex`]), the widths that may hold records, and the state of what has loaded
//! ([`SyncState`]). The lease and the VM counter are in [`crate::live::lease`].

use crate::keys::{hash_key, KeyHash};
use crate::live::settings::KeySetConfig;
use std::fmt;

/// Shared data as the sync uses it: the host's in the filter, a map in tests. Envoy's semantics: a
/// write without `cas`, or to an absent entry, always succeeds; every write gives the entry a new
/// token from one counter of the process, so no two writes ever leave the same token.
pub trait Store {
    /// The value and compare-and-swap token of `entry`; `None` while it is absent.
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError>;
    /// Writes `entry`; with `cas`, only while its token is still `cas`: `Ok(false)` when another
    /// write came first.
    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError>;
}

/// What a store was asked to do when it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreOp {
    Read,
    Write,
}

/// A read or write the host's store refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    pub op: StoreOp,
    pub entry: String,
    /// What the host answered (its status).
    pub status: String,
}

impl StoreError {
    pub fn new(op: StoreOp, entry: &str, status: impl Into<String>) -> Self {
        StoreError { op, entry: entry.to_string(), status: status.into() }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            StoreOp::Read => "read",
            StoreOp::Write => "write",
        };
        write!(f, "cannot {op} {}: {}", self.entry, self.status)
    }
}

impl From<StoreError> for String {
    fn from(e: StoreError) -> String {
        e.to_string()
    }
}

/// Writes `entry` unconditionally (no compare-and-swap).
pub fn write_entry(store: &dyn Store, entry: &str, value: &[u8]) -> Result<(), String> {
    store.set(entry, value, None).map(|_| ()).map_err(String::from)
}

/// The value of `entry`, or `None` when it is absent or cannot be read.
fn read_entry(store: &dyn Store, entry: &str) -> Option<Vec<u8>> {
    store.get(entry).ok().flatten().map(|(value, _)| value)
}

/// What has loaded, or `None` before a set has (or when the state cannot be read).
pub fn read_state(store: &dyn Store, config: &KeySetConfig) -> Option<SyncState> {
    SyncState::decode(&read_entry(store, &config.state_entry())?)
}

/// The index of shard `prefix` as stored, or `None` (absent, voided, unreadable).
pub fn read_index(store: &dyn Store, config: &KeySetConfig, prefix: &str) -> Option<ShardIndex> {
    ShardIndex::decode(&read_entry(store, &config.shard_entry(prefix))?)
}

/// The `widths` mask as stored (0 when absent).
pub fn read_widths(store: &dyn Store, config: &KeySetConfig) -> u8 {
    read_entry(store, &config.widths_entry()).map_or(0, |bytes| decode_widths(&bytes))
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
