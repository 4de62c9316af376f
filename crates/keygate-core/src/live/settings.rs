//! The `key_set` settings: parsed ([`RawKeySet`]), then compiled ([`KeySetConfig`]) into what the
//! sync needs: the endpoint, the schedule (tick, lease, backoff), the body limits and the names of
//! the shared-data entries.

use crate::error::ConfigError;
use crate::keys::{hash_key, KeyHash};
use serde::Deserialize;

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

/// The version of the shared-data layout (the table in [`crate::live`]).
pub const LAYOUT: u32 = 3;

/// `max_manifest_bytes` by default: 1 MiB holds a manifest of 4 096 shards (about 130 bytes each).
pub const DEFAULT_MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// `max_shard_bytes` by default: 64 MiB holds a 16th of a million keys of 1 KiB records.
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 64 << 20;
const MANIFEST_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(64 << 20);
const SHARD_BYTES_RANGE: std::ops::RangeInclusive<u64> = 1024..=(1 << 30);

const MAX_BACKOFF_MS: u64 = 30_000;

/// The entry listing the shard widths whose indexes may hold records, as a bit mask.
pub const WIDTHS: &str = "widths";

/// What an answer of the key-set endpoint is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetched<'a> {
    Manifest,
    /// The shard with this prefix.
    Shard(&'a str),
}

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

    /// How long a sync may go without any answer before it is abandoned. The host answers every
    /// call by its timeout; this only guards against an answer lost on the way.
    pub fn silence_limit_ms(&self) -> i64 {
        i64::try_from(self.timeout_ms).unwrap_or(i64::MAX).saturating_mul(4).saturating_add(5_000)
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
