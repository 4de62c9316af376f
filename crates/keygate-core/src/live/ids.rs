//! Record ids are unique across the whole set: the ids a sync has seen, by digest and place
//! ([`IdIndex`]), and how a digest's match is confirmed on the records it names.

use crate::error::ConfigError;
use crate::keys::stored::decode_key;
use crate::keys::{Key, KeyHash, KeySet};
use crate::live::formats::ShardRef;
use crate::live::settings::KeySetConfig;
use crate::live::store::{id_digest, read_index, Store};
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

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
    inline: Arc<HashSet<u32>>,
    shards: HashMap<u32, u32>,
}

impl IdIndex {
    pub fn new(inline: Arc<HashSet<u32>>) -> Self {
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
    let index = read_index(store, config, prefix)?;
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
