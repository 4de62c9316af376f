//! What a sync writes, in an order that keeps shared data consistent whatever stops it: each
//! fetched shard's records, tombstones and index ([`apply_shard`]), what older layouts left
//! ([`retire`]), and last the state that marks the set loaded ([`apply_sync`]).

use crate::error::ConfigError;
use crate::keys::stored::{decode_key, encode_key, TOMBSTONE};
use crate::keys::{Key, KeyHash, KeySet};
use crate::live::formats::{Manifest, ShardRef};
use crate::live::settings::KeySetConfig;
use crate::live::store::{id_digest, width_bit, ShardIndex, SyncState, PENDING_ETAG};
use std::collections::HashSet;

/// What a sync that changes the shard layout leaves behind: the index entries of every other layout
/// that may hold records ([`stale_widths`](crate::live::store::stale_widths)) and every hash they held.
#[derive(Debug, Default)]
pub struct Retired {
    pub prefixes: Vec<String>,
    pub hashes: Vec<KeyHash>,
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
/// `unchanged_keys` is what the indexes of the shards not fetched hold (their etags matched, so
/// their indexes are complete): the state counts those and the fetched shards' records, exactly,
/// whatever an earlier sync that stopped part-way left in the indexes it rewrote.
#[allow(clippy::too_many_arguments)] // one sync's inputs, all needed; a struct would only rename them
pub fn apply_sync(
    config: &KeySetConfig,
    manifest: &Manifest,
    fetched: &[FetchedShard],
    retired: Option<&Retired>,
    unchanged_keys: u64,
    manifest_etag: Option<String>,
    now_ms: i64,
    write: &mut Write,
) -> Result<(), String> {
    let mut keys = if retired.is_some() { 0 } else { unchanged_keys };
    for f in fetched {
        apply_shard(config, f, write)?;
        keys = keys.saturating_add(f.records.len() as u64);
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
