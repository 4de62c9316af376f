//! Key records and the key set: lookup by the SHA-256 of the whole presented key.
//!
//! [`record`] reads and checks records as configured and published; [`stored`] is their compact
//! form in a host's shared store.

pub mod record;
pub mod stored;

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::ops::Deref;
use std::sync::Arc;

/// The SHA-256 of a whole presented key: the only thing keygate keeps of a key.
pub type KeyHash = [u8; 32];

pub fn hash_key(key: &[u8]) -> KeyHash {
    Sha256::digest(key).into()
}

/// One compiled key record. Holds no secret: only the hash identifies the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub id: String,
    pub org: String,
    pub name: Option<String>,
    pub scopes: Vec<String>,
    /// Sorted by name, so lookups are a binary search.
    pub attributes: Vec<(String, String)>,
    /// Unix milliseconds at which the key stops working.
    pub expires_at_ms: Option<i64>,
    pub revoked: bool,
}

impl Key {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()
            .and_then(|i| self.attributes.get(i))
            .map(|(_, v)| v.as_str())
    }

    /// True once `now_ms` has reached the key's expiry instant.
    pub fn expired_at(&self, now_ms: i64) -> bool {
        self.expires_at_ms.is_some_and(|at| now_ms >= at)
    }
}

/// A found key record: borrowed from the inline set, or shared from a cache of the live set.
#[derive(Debug, Clone)]
pub enum KeyRef<'a> {
    Borrowed(&'a Key),
    Shared(Arc<Key>),
}

impl Deref for KeyRef<'_> {
    type Target = Key;

    fn deref(&self) -> &Key {
        match self {
            KeyRef::Borrowed(key) => key,
            KeyRef::Shared(key) => key,
        }
    }
}

/// What a key source answers for one hash.
#[derive(Debug)]
pub enum Lookup<'a> {
    Found(KeyRef<'a>),
    NotFound,
    /// The source has never loaded a key set, so it cannot tell: the request is refused.
    Unavailable,
}

/// Anything that can find a key record by hash: the inline set, or a live set in shared data.
pub trait KeySource {
    fn lookup(&self, hash: &KeyHash) -> Lookup<'_>;
}

/// The inline key set from the plugin configuration.
#[derive(Debug, Default)]
pub struct KeySet {
    by_hash: HashMap<KeyHash, Key>,
}

impl KeySet {
    pub fn new(by_hash: HashMap<KeyHash, Key>) -> Self {
        KeySet { by_hash }
    }

    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }

    pub fn contains(&self, hash: &KeyHash) -> bool {
        self.by_hash.contains_key(hash)
    }

    /// Every record, in no particular order.
    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.by_hash.values()
    }

    pub fn into_entries(self) -> Vec<(KeyHash, Key)> {
        self.by_hash.into_iter().collect()
    }
}

impl KeySource for KeySet {
    fn lookup(&self, hash: &KeyHash) -> Lookup<'_> {
        match self.by_hash.get(hash) {
            Some(key) => Lookup::Found(KeyRef::Borrowed(key)),
            None => Lookup::NotFound,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_sha256_of_the_whole_key() {
        assert_eq!(hex::encode(hash_key(b"abc")), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn key_expires_at_its_instant() {
        let key = Key {
            id: "k".into(),
            org: "o".into(),
            name: None,
            scopes: vec![],
            attributes: vec![("team".into(), "t1".into()), ("venue".into(), "v_7".into())],
            expires_at_ms: Some(1_000),
            revoked: false,
        };
        assert!(!key.expired_at(999));
        assert!(key.expired_at(1_000));
        assert_eq!(key.attribute("venue"), Some("v_7"));
        assert_eq!(key.attribute("team"), Some("t1"));
        assert_eq!(key.attribute("org"), None);
    }
}
