//! A [`Store`] in process memory, for a host without shared data of its own (a native Envoy module:
//! one store per process, read by every worker thread). It keeps Envoy's semantics, so the sync and
//! the record lookup run on it unchanged: a write without `cas`, or to an absent entry, always
//! succeeds, and every write gives its entry a fresh token from one counter.

use crate::live::store::{Store, StoreError, StoreOp};
use std::collections::HashMap;
use std::sync::RwLock;

/// Entries and the next compare-and-swap token, behind one lock: readers share it, a write takes it
/// alone for the length of one map insert.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<String, (Vec<u8>, u32)>,
    /// The token the next write gets (0 is never given: a token is never mistaken for "none").
    next_cas: u32,
}

impl MemoryStore {
    pub fn new() -> Self {
        MemoryStore::default()
    }

    /// How many entries the store holds.
    pub fn len(&self) -> usize {
        self.inner.read().map_or(0, |inner| inner.entries.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Store for MemoryStore {
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        // A poisoned lock means a writer panicked, which keygate's code never does; it is still
        // refused rather than read, as a host error would be.
        let inner = self.inner.read().map_err(|_| StoreError::new(StoreOp::Read, entry, "lock poisoned"))?;
        Ok(inner.entries.get(entry).cloned())
    }

    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        let mut inner = self.inner.write().map_err(|_| StoreError::new(StoreOp::Write, entry, "lock poisoned"))?;
        if let (Some((_, current)), Some(cas)) = (inner.entries.get(entry), cas) {
            if *current != cas {
                return Ok(false);
            }
        }
        let token = inner.next_cas.max(1);
        inner.next_cas = token.wrapping_add(1);
        inner.entries.insert(entry.to_string(), (value.to_vec(), token));
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::lease::number_vm;
    use crate::live::settings::{KeySetConfig, RawKeySet};
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn a_write_with_a_stale_token_is_refused_and_one_with_the_current_token_wins() {
        let store = MemoryStore::new();
        assert_eq!(store.get("e").unwrap(), None);
        assert!(store.set("e", b"1", Some(42)).unwrap(), "a write to an absent entry always succeeds");
        let (value, first) = store.get("e").unwrap().unwrap();
        assert_eq!(value, b"1");
        assert!(store.set("e", b"2", None).unwrap(), "a write without cas always succeeds");
        assert!(!store.set("e", b"3", Some(first)).unwrap(), "the token moved on");
        let (value, second) = store.get("e").unwrap().unwrap();
        assert_eq!(value, b"2");
        assert_ne!(first, second);
        assert!(store.set("e", b"4", Some(second)).unwrap());
        assert_eq!(store.get("e").unwrap().unwrap().0, b"4");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn threads_numbering_themselves_at_once_never_share_a_number() {
        let raw: RawKeySet = serde_json::from_value(serde_json::json!({"cluster": "k", "path": "/m"})).unwrap();
        let config = Arc::new(KeySetConfig::compile(&raw).unwrap());
        let store = Arc::new(MemoryStore::new());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, config) = (Arc::clone(&store), Arc::clone(&config));
                std::thread::spawn(move || (0..50).map(|_| number_vm(&*store, &config).unwrap()).collect::<Vec<_>>())
            })
            .collect();
        let numbers: Vec<u32> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
        let distinct: HashSet<u32> = numbers.iter().copied().collect();
        assert_eq!(distinct.len(), 400, "{numbers:?}");
    }
}
