//! Key records as written in the configuration's `keys` and in key-set shards: read, checked and
//! compiled into [`Key`]s, every refusal naming its field.

use super::{Key, KeyHash, KeySet};
use crate::checks::{check_header_value, check_scope};
use crate::error::{ConfigError, ConfigErrors, Problems};
use crate::json::unique_names;
use crate::time::parse_rfc3339;
use serde::{Deserialize, Deserializer};
use std::collections::hash_map::Entry;
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
    /// When the key was made (RFC 3339); for people and tools, never read by the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The key as it may be shown once it is gone: its public part and at most the last
    /// [`PREVIEW_SECRET_CHARS`] characters of its secret ([`preview`]); never read by the decision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
}

/// How much of a key's secret a `preview` may show: its last four characters.
pub const PREVIEW_SECRET_CHARS: usize = 4;
/// The longest prefix (`sk_live_`) a `preview` may show before the key's id.
pub const PREVIEW_MAX_PREFIX: usize = 64;
/// What stands in a `preview` for the rest of the secret.
pub const PREVIEW_ELLIPSIS: char = '…';

/// The `preview` of the key `{prefix}{id}_{secret}`: `{prefix}{id}_…` and the secret's last
/// [`PREVIEW_SECRET_CHARS`] characters (`sk_live_ab12cd34_…9f3a`). Nothing else of the secret.
pub fn preview(prefix: &str, id: &str, secret: &str) -> String {
    let skip = secret.chars().count().saturating_sub(PREVIEW_SECRET_CHARS);
    let tail: String = secret.chars().skip(skip).collect();
    format!("{prefix}{id}_{PREVIEW_ELLIPSIS}{tail}")
}

/// Checks a record's `preview` against its `id`: a prefix of at most [`PREVIEW_MAX_PREFIX`]
/// visible ASCII characters, the id, `_`, one `…`, then at most [`PREVIEW_SECRET_CHARS`] visible
/// ASCII characters. Whatever the key looked like, such a preview cannot hold more of a secret
/// than its last four characters: everything before the `…` is the public part.
fn check_preview(preview: &str, id: &str) -> Result<(), String> {
    // The value itself is never echoed: a refused preview may be a whole key.
    let shape = || {
        format!(
            "expected the key's public part, \"{PREVIEW_ELLIPSIS}\" and at most the last {PREVIEW_SECRET_CHARS} characters of \
             its secret, such as \"sk_live_{id}_{PREVIEW_ELLIPSIS}9f3a\" (the value is not repeated: it may hold a secret)"
        )
    };
    let visible = |s: &str| s.bytes().all(|c| c.is_ascii_graphic());
    let (head, tail) = preview.split_once(PREVIEW_ELLIPSIS).ok_or_else(shape)?;
    let prefix = head.strip_suffix('_').and_then(|h| h.strip_suffix(id)).ok_or_else(shape)?;
    if prefix.len() > PREVIEW_MAX_PREFIX || !visible(prefix) || tail.len() > PREVIEW_SECRET_CHARS || !visible(tail) {
        return Err(shape());
    }
    Ok(())
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

/// Compiles key records; `field` names the list (`keys`, or a key-set file's `keys`). Stops at the
/// first problem.
pub fn compile_keys(raw: &[RawKey], field: &str) -> Result<KeySet, ConfigError> {
    let mut checker = KeyChecker::new(field, raw.len());
    let mut by_hash = HashMap::with_capacity(raw.len());
    for record in raw {
        let (hash, key) = checker.check(record)?;
        by_hash.insert(hash, key);
    }
    Ok(KeySet::new(by_hash))
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

    /// Compiles the next record of the list; stops at its first problem.
    pub fn check(&mut self, record: &RawKey) -> Result<(KeyHash, Key), ConfigError> {
        self.check_all(record).map_err(ConfigErrors::into_first)
    }

    /// Compiles the next record of the list, with every problem it has: its own fields', and an id
    /// or hash an earlier record has (even when another of its fields is wrong, as long as its id or
    /// hash is itself well-formed).
    pub fn check_all(&mut self, record: &RawKey) -> Result<(KeyHash, Key), ConfigErrors> {
        let i = self.next;
        self.next += 1;
        let here = format!("{}[{i}]", self.field);
        match compile_key_all(record, &here) {
            Ok(compiled) => match self.duplicates(record, &here, Some(compiled.0)).into_errors() {
                None => Ok(compiled),
                Some(errors) => Err(errors),
            },
            Err(mut errors) => {
                errors.extend(self.duplicates(record, &here, parse_hash(&record.hash).ok()));
                Err(errors)
            }
        }
    }

    /// An id or hash an earlier record has; the first record of each is remembered.
    fn duplicates(&mut self, record: &RawKey, here: &str, hash: Option<KeyHash>) -> Problems {
        let (field, i) = (self.field, self.next - 1);
        let mut problems = Problems::default();
        if id_is_valid(&record.id) {
            match self.first_of_id.entry(record.id.clone()) {
                Entry::Occupied(first) => problems.push(ConfigError::duplicate(
                    format!("{here}.id"),
                    format!("{field}[{}]", first.get()),
                    format!("duplicate id {:?} (also {field}[{}])", record.id, first.get()),
                )),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        if let Some(hash) = hash {
            match self.first_of_hash.entry(hash) {
                Entry::Occupied(first) => problems.push(ConfigError::duplicate(
                    format!("{here}.hash"),
                    format!("{field}[{}]", first.get()),
                    format!("duplicate hash (also {field}[{}])", first.get()),
                )),
                Entry::Vacant(slot) => {
                    slot.insert(i);
                }
            }
        }
        problems
    }
}

/// The configuration's `keys`, compiled record by record while the JSON is read, so that a large
/// inline set is never held both as parsed records and as the compiled table. A record's problems
/// do not stop the reading: they are kept, for the compile to report with the rest.
#[derive(Debug, Default)]
pub struct InlineKeys {
    pub set: KeySet,
    pub problems: Problems,
}

impl<'de> Deserialize<'de> for InlineKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Records;
        impl<'de> serde::de::Visitor<'de> for Records {
            type Value = InlineKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key records")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<InlineKeys, A::Error> {
                let capacity = seq.size_hint().unwrap_or(0);
                let mut checker = KeyChecker::new("keys", capacity);
                let mut by_hash = HashMap::with_capacity(capacity);
                let mut problems = Problems::default();
                while let Some(record) = seq.next_element::<RawKey>()? {
                    match checker.check_all(&record) {
                        Ok((hash, key)) => {
                            by_hash.insert(hash, key);
                        }
                        Err(errors) => problems.extend(errors),
                    }
                }
                Ok(InlineKeys { set: KeySet::new(by_hash), problems })
            }
        }
        d.deserialize_seq(Records)
    }
}

/// Whether `id` is a valid record id: non-empty visible ASCII.
pub(crate) fn id_is_valid(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|c| c.is_ascii_graphic())
}

/// Checks and compiles one key record; `field` is where it stands (`keys[3]`). Stops at the first
/// problem.
pub fn compile_key(raw: &RawKey, field: &str) -> Result<(KeyHash, Key), ConfigError> {
    compile_key_all(raw, field).map_err(ConfigErrors::into_first)
}

/// Checks and compiles one key record, with every problem it has, in the order of its fields.
pub fn compile_key_all(raw: &RawKey, field: &str) -> Result<(KeyHash, Key), ConfigErrors> {
    let at = |name: &str| format!("{field}.{name}");
    let mut problems = Problems::default();
    if !id_is_valid(&raw.id) {
        problems.push(ConfigError::new(at("id"), "must be non-empty visible ASCII"));
    }
    let hash = problems.take(parse_hash(&raw.hash).map_err(|m| ConfigError::new(at("hash"), m)));
    problems.take(check_header_value(&raw.org, &at("org")));
    if let Some(name) = &raw.name {
        problems.take(check_header_value(name, &at("name")));
    }
    for (i, s) in raw.scopes.iter().enumerate() {
        problems.take(check_scope(s, &at(&format!("scopes[{i}]"))));
    }
    for (name, value) in &raw.attributes {
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
            problems.push(ConfigError::new(at("attributes"), "attribute names must be non-empty visible ASCII"));
        }
        problems.take(check_header_value(value, &at(&format!("attributes.{name}"))));
    }
    let expires_at_ms = match &raw.expires_at {
        None => None,
        Some(Expiry::UnixSeconds(s)) => problems
            .take(s.checked_mul(1_000).ok_or_else(|| ConfigError::new(at("expires_at"), "Unix seconds out of range"))),
        Some(Expiry::Text(t)) => problems.take(parse_rfc3339(t).map_err(|m| ConfigError::new(at("expires_at"), m))),
    };
    if let Some(t) = &raw.created_at {
        problems.take(parse_rfc3339(t).map_err(|m| ConfigError::new(at("created_at"), m)));
    }
    if let Some(p) = &raw.preview {
        problems.take(check_preview(p, &raw.id).map_err(|m| ConfigError::new(at("preview"), m)));
    }
    if let Some(errors) = problems.into_errors() {
        return Err(errors);
    }
    let key = Key {
        id: raw.id.clone(),
        org: raw.org.clone(),
        name: raw.name.clone(),
        scopes: raw.scopes.clone(),
        attributes: raw.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        expires_at_ms,
        revoked: raw.revoked,
    };
    // Every check passed, so the hash is there.
    Ok((hash.unwrap_or_default(), key))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(extra: serde_json::Value) -> RawKey {
        let mut v = serde_json::json!({"id": "ab12cd34", "hash": "0".repeat(64), "org": "o"});
        if let (Some(v), serde_json::Value::Object(extra)) = (v.as_object_mut(), extra) {
            v.extend(extra);
        }
        serde_json::from_value(v).unwrap()
    }

    fn problem(extra: serde_json::Value) -> String {
        compile_key(&record(extra), "keys[0]").unwrap_err().to_string()
    }

    #[test]
    fn preview_shows_the_public_part_and_the_last_four_characters_of_the_secret() {
        let secret = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c29f3a";
        assert_eq!(preview("sk_live_", "ab12cd34", secret), "sk_live_ab12cd34_…9f3a");
        assert_eq!(preview("sk_live_", "ab12cd34", "ab"), "sk_live_ab12cd34_…ab");
    }

    #[test]
    fn created_at_and_preview_are_accepted_and_leave_the_key_as_it_was() {
        let plain = compile_key(&record(serde_json::json!({})), "k").unwrap();
        let with = compile_key(
            &record(serde_json::json!({"created_at": "2026-12-03T14:00:00Z", "preview": "sk_live_ab12cd34_…9f3a"})),
            "k",
        )
        .unwrap();
        assert_eq!(plain, with);
        for ok in ["sk_live_ab12cd34_…", "ab12cd34_…9f3a", "pk_test_ab12cd34_…a"] {
            assert!(compile_key(&record(serde_json::json!({"preview": ok})), "k").is_ok(), "{ok}");
        }
    }

    #[test]
    fn a_preview_that_could_hold_more_of_the_secret_is_refused() {
        let whole = "sk_live_ab12cd34_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c29f3a";
        for bad in [
            whole.to_string(),
            "sk_live_ab12cd34_…9f3a0".to_string(),
            "sk_live_ab12cd34_9f8e…9f3a".to_string(),
            "sk_live_ab12cd34…9f3a".to_string(),
            "sk_live_ffffffff_…9f3a".to_string(),
            "sk_live_ab12cd34_…9f…3a".to_string(),
            format!("{}ab12cd34_…9f3a", "x".repeat(65)),
            "sk live_ab12cd34_…9f3a".to_string(),
            String::new(),
        ] {
            let e = problem(serde_json::json!({"preview": bad}));
            assert!(e.starts_with("keys[0].preview: expected the key's public part"), "{bad:?}: {e}");
            assert!(!e.contains("9f8e7d6c5b4a"), "the refused secret is echoed: {e}");
        }
    }

    #[test]
    fn created_at_must_be_rfc3339() {
        assert_eq!(
            problem(serde_json::json!({"created_at": "yesterday"})),
            "keys[0].created_at: expected an RFC 3339 timestamp such as 2027-01-01T00:00:00Z, got \"yesterday\""
        );
    }
}
