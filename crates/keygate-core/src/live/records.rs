//! The request path's side of a live key set: one key's record read from the store, kept decoded
//! in a small per-VM cache that follows the polling VM's generation entry.

use crate::keys::stored::decode_key;
use crate::keys::{Key, KeyHash, KeyRef, Lookup};
use crate::live::settings::KeySetConfig;
use crate::live::store::{Store, StoreError};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Most records one VM keeps decoded.
pub const MAX_CACHED: usize = 10_000;

/// A live key set as one VM sees it: where it comes from, whether it has loaded, and the records
/// this VM has decoded. Shared by the VM's request contexts and its sync.
#[derive(Debug)]
pub struct LiveSet {
    config: KeySetConfig,
    /// Set once the set has been seen loaded; a loaded set never unloads.
    loaded: Cell<bool>,
    cache: RefCell<RecordCache>,
}

/// Decoded live records, so that a key in use costs no shared-data read per request. Emptied when
/// the polling VM publishes a new generation (checked on every tick) and when it grows too large.
#[derive(Debug, Default)]
struct RecordCache {
    generation: Option<Vec<u8>>,
    records: HashMap<KeyHash, Arc<Key>>,
}

impl LiveSet {
    pub fn new(config: KeySetConfig) -> Self {
        LiveSet { config, loaded: Cell::new(false), cache: RefCell::default() }
    }

    pub fn config(&self) -> &KeySetConfig {
        &self.config
    }

    /// The record of `hash` in the live set: found, unknown, or unavailable while no set has loaded
    /// and its shard has not been written either. A store error is the host's to report (with no
    /// entry name: a record's entry derives from the presented key).
    pub fn find(&self, store: &dyn Store, hash: &KeyHash) -> Result<Lookup<'static>, StoreError> {
        if let Some(key) = self.cache.borrow().records.get(hash) {
            return Ok(Lookup::Found(KeyRef::Shared(Arc::clone(key))));
        }
        let lookup = read_record(store, &self.config, hash, || self.loaded(store))?;
        if let Lookup::Found(KeyRef::Shared(key)) = &lookup {
            self.cache.borrow_mut().insert(*hash, Arc::clone(key));
        }
        Ok(lookup)
    }

    /// Whether a set has loaded: this VM saw it, or the state entry says so.
    pub fn loaded(&self, store: &dyn Store) -> bool {
        if !self.loaded.get() && matches!(store.get(&self.config.state_entry()), Ok(Some((v, _))) if !v.is_empty()) {
            self.loaded.set(true);
        }
        self.loaded.get()
    }

    /// Called by the sync that loaded a set.
    pub fn mark_loaded(&self) {
        self.loaded.set(true);
    }

    /// Follows the generation in shared data: a new one empties the cache.
    pub fn follow(&self, store: &dyn Store) {
        let current =
            store.get(&self.config.generation_entry()).ok().flatten().map(|(v, _)| v).filter(|v| !v.is_empty());
        let mut cache = self.cache.borrow_mut();
        if current != cache.generation {
            cache.records.clear();
            cache.generation = current;
        }
    }

    /// How many records this VM holds decoded.
    pub fn cached(&self) -> usize {
        self.cache.borrow().records.len()
    }
}

/// One key's record read from the store and decoded, with no cache: found, unknown, or unavailable
/// while `loaded` says no set has loaded and its shard has not been written either. The lookup of
/// [`LiveSet`] and of [`SharedLiveSet`].
fn read_record(
    store: &dyn Store,
    config: &KeySetConfig,
    hash: &KeyHash,
    loaded: impl FnOnce() -> bool,
) -> Result<Lookup<'static>, StoreError> {
    Ok(match store.get(&config.key_entry(hash))? {
        Some((bytes, _)) => match decode_key(&bytes) {
            Some(key) => Lookup::Found(KeyRef::Shared(Arc::new(key))),
            // A tombstone (a removed key), or nothing readable.
            None => Lookup::NotFound,
        },
        None if loaded() => Lookup::NotFound,
        None => Lookup::Unavailable,
    })
}

/// A live key set read by several threads at once (a native host's workers over one store in
/// process memory): the same lookup as [`LiveSet::find`], without the per-VM cache, so that it is
/// `Sync`. Each found record is decoded from the store on every lookup.
#[derive(Debug)]
pub struct SharedLiveSet {
    config: KeySetConfig,
    /// Set once the set has been seen loaded; a loaded set never unloads.
    loaded: AtomicBool,
}

impl SharedLiveSet {
    pub fn new(config: KeySetConfig) -> Self {
        SharedLiveSet { config, loaded: AtomicBool::new(false) }
    }

    pub fn config(&self) -> &KeySetConfig {
        &self.config
    }

    /// As [`LiveSet::find`].
    pub fn find(&self, store: &dyn Store, hash: &KeyHash) -> Result<Lookup<'static>, StoreError> {
        read_record(store, &self.config, hash, || self.loaded(store))
    }

    /// As [`LiveSet::loaded`].
    pub fn loaded(&self, store: &dyn Store) -> bool {
        if !self.loaded.load(Ordering::Acquire)
            && matches!(store.get(&self.config.state_entry()), Ok(Some((v, _))) if !v.is_empty())
        {
            self.loaded.store(true, Ordering::Release);
        }
        self.loaded.load(Ordering::Acquire)
    }
}

impl RecordCache {
    fn insert(&mut self, hash: KeyHash, key: Arc<Key>) {
        if self.records.len() >= MAX_CACHED {
            self.records.clear();
        }
        self.records.insert(hash, key);
    }
}
