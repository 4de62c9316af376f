//! Key records as written in the configuration's `keys` and in key-set shards: read, checked and
//! compiled into [`Key`]s, every refusal naming its field.

use super::{Key, KeyHash, KeySet};
use crate::checks::{check_header_value, check_scope};
use crate::error::ConfigError;
use crate::json::{unique_names, COMPILE_ERROR};
use crate::time::parse_rfc3339;
use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A key record, as written in `keys` (and in key-set files).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub hash: String,
    pub org: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_names")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Expiry>,
    #[serde(default)]
    pub revoked: bool,
}

/// `expires_at`: RFC 3339 text or integer Unix seconds.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Expiry {
    UnixSeconds(i64),
    Text(String),
}

/// Read by type, not as an untagged enum: serde would first buffer whatever value stands there (a
/// megabyte of nested arrays, say) to try each variant on it, then report an error past its end.
/// This refuses anything else at its first character.
impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl serde::de::Visitor<'_> for Either {
            type Value = Expiry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("RFC 3339 text or integer Unix seconds")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Expiry, E> {
                Ok(Expiry::UnixSeconds(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Expiry, E> {
                i64::try_from(v)
                    .map(Expiry::UnixSeconds)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Expiry, E> {
                Ok(Expiry::Text(v.to_string()))
            }
        }
        d.deserialize_any(Either)
    }
}

/// Compiles key records; `field` names the list (`keys`, or a key-set file's `keys`).
pub fn compile_keys(raw: &[RawKey], field: &str) -> Result<KeySet, ConfigError> {
    let mut builder = KeySetBuilder::new(field, raw.len());
    for record in raw {
        builder.add(record)?;
    }
    Ok(builder.finish())
}

/// Compiles key records one at a time, in order, refusing a duplicate id or hash.
pub struct KeyChecker<'f> {
    field: &'f str,
    next: usize,
    first_of_hash: HashMap<KeyHash, usize>,
    first_of_id: HashMap<String, usize>,
}

impl<'f> KeyChecker<'f> {
    /// `field` names the list (`keys`); `capacity` is how many records to expect.
    pub fn new(field: &'f str, capacity: usize) -> Self {
        KeyChecker {
            field,
            next: 0,
            first_of_hash: HashMap::with_capacity(capacity),
            first_of_id: HashMap::with_capacity(capacity),
        }
    }

    /// Compiles the next record of the list.
    pub fn check(&mut self, record: &RawKey) -> Result<(KeyHash, Key), ConfigError> {
        let (field, i) = (self.field, self.next);
        self.next += 1;
        let here = format!("{field}[{i}]");
        let (hash, key) = compile_key(record, &here)?;
        if let Some(j) = self.first_of_id.insert(record.id.clone(), i) {
            return Err(ConfigError::new(
                format!("{here}.id"),
                format!("duplicate id {:?} (also {field}[{j}])", record.id),
            ));
        }
        if let Some(j) = self.first_of_hash.insert(hash, i) {
            return Err(ConfigError::new(format!("{here}.hash"), format!("duplicate hash (also {field}[{j}])")));
        }
        Ok((hash, key))
    }
}

/// Builds a key set from records checked one at a time.
struct KeySetBuilder<'f> {
    checker: KeyChecker<'f>,
    by_hash: HashMap<KeyHash, Key>,
}

impl<'f> KeySetBuilder<'f> {
    fn new(field: &'f str, capacity: usize) -> Self {
        KeySetBuilder { checker: KeyChecker::new(field, capacity), by_hash: HashMap::with_capacity(capacity) }
    }

    fn add(&mut self, record: &RawKey) -> Result<(), ConfigError> {
        let (hash, key) = self.checker.check(record)?;
        self.by_hash.insert(hash, key);
        Ok(())
    }

    fn finish(self) -> KeySet {
        KeySet::new(self.by_hash)
    }
}

/// The configuration's `keys`, compiled record by record while the JSON is read, so that a large
/// inline set is never held both as parsed records and as the compiled table.
#[derive(Debug, Default)]
pub struct InlineKeys(pub KeySet);

impl<'de> Deserialize<'de> for InlineKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Records;
        impl<'de> serde::de::Visitor<'de> for Records {
            type Value = InlineKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key records")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<InlineKeys, A::Error> {
                let mut builder = KeySetBuilder::new("keys", seq.size_hint().unwrap_or(0));
                while let Some(record) = seq.next_element::<RawKey>()? {
                    builder.add(&record).map_err(|e| {
                        serde::de::Error::custom(format!("{COMPILE_ERROR}{}{COMPILE_ERROR}{}", e.field, e.message))
                    })?;
                }
                Ok(InlineKeys(builder.finish()))
            }
        }
        d.deserialize_seq(Records)
    }
}

/// Checks and compiles one key record; `field` is where it stands (`keys[3]`).
pub fn compile_key(raw: &RawKey, field: &str) -> Result<(KeyHash, Key), ConfigError> {
    let at = |name: &str| format!("{field}.{name}");
    if raw.id.is_empty() || !raw.id.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::new(at("id"), "must be non-empty visible ASCII"));
    }
    let hash = parse_hash(&raw.hash).map_err(|m| ConfigError::new(at("hash"), m))?;
    check_header_value(&raw.org, &at("org"))?;
    if let Some(name) = &raw.name {
        check_header_value(name, &at("name"))?;
    }
    for (i, s) in raw.scopes.iter().enumerate() {
        check_scope(s, &at(&format!("scopes[{i}]")))?;
    }
    for (name, value) in &raw.attributes {
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::new(at("attributes"), "attribute names must be non-empty visible ASCII"));
        }
        check_header_value(value, &at(&format!("attributes.{name}")))?;
    }
    let expires_at_ms = match &raw.expires_at {
        None => None,
        Some(Expiry::UnixSeconds(s)) => {
            Some(s.checked_mul(1_000).ok_or_else(|| ConfigError::new(at("expires_at"), "Unix seconds out of range"))?)
        }
        Some(Expiry::Text(t)) => Some(parse_rfc3339(t).map_err(|m| ConfigError::new(at("expires_at"), m))?),
    };
    let key = Key {
        id: raw.id.clone(),
        org: raw.org.clone(),
        name: raw.name.clone(),
        scopes: raw.scopes.clone(),
        attributes: raw.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        expires_at_ms,
        revoked: raw.revoked,
    };
    Ok((hash, key))
}

/// Decodes a 64-hex-digit SHA-256, either case.
pub fn parse_hash(text: &str) -> Result<KeyHash, String> {
    let mut hash = [0u8; 32];
    if text.len() != 64 {
        return Err(format!("expected 64 hex characters (a SHA-256), got {}", text.len()));
    }
    hex::decode_to_slice(text, &mut hash).map_err(|_| "expected 64 hex characters (a SHA-256)".to_string())?;
    Ok(hash)
}
