//! The `usage` settings: parsed ([`RawUsage`]), then compiled ([`UsageConfig`]) into where reports
//! go, how often, how long one may take, and how many keys are kept between two reports.

use crate::error::ConfigError;
use crate::keys::hash_key;
use crate::usage::tally::Tally;
use serde::Deserialize;
use std::ops::RangeInclusive;

/// The compiled `usage` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageConfig {
    /// The Envoy cluster of the receiver.
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// How often a report is made, in milliseconds.
    pub flush_interval_ms: u64,
    /// How long one POST may take before it counts as failed.
    pub timeout_ms: u64,
    /// Distinct key ids kept between two reports, by each tally ([`Tally`]); the requests of any
    /// further key are counted as dropped.
    pub max_pending_keys: usize,
    /// Names this receiver in shared-data entries.
    pub namespace: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsage {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub flush_interval_ms: Option<u64>,
    pub timeout_ms: Option<u64>,
    pub max_pending_keys: Option<u64>,
}

pub const DEFAULT_FLUSH_INTERVAL_MS: u64 = 10_000;
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;
pub const DEFAULT_MAX_PENDING_KEYS: u64 = 10_000;
const FLUSH_INTERVAL_RANGE: RangeInclusive<u64> = 1_000..=3_600_000;
const TIMEOUT_RANGE: RangeInclusive<u64> = 10..=60_000;
const PENDING_KEYS_RANGE: RangeInclusive<u64> = 1..=1_000_000;

/// The first wait after a failed POST; each failure in a row doubles it, up to the flush interval.
pub const FIRST_RETRY_MS: u64 = 1_000;

/// How long past `timeout_ms` a POST may stay unanswered before it counts as failed. The host
/// answers every call by its timeout; this only guards against an answer lost on the way.
pub const ANSWER_SLACK_MS: u64 = 1_000;

impl UsageConfig {
    pub fn compile(raw: &RawUsage) -> Result<Self, ConfigError> {
        let text_ok = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_graphic());
        if !text_ok(&raw.cluster) {
            return Err(ConfigError::new("usage.cluster", "must name an Envoy cluster"));
        }
        if !text_ok(&raw.authority) {
            return Err(ConfigError::new("usage.authority", "must be a host name"));
        }
        if !raw.path.starts_with('/') || !text_ok(&raw.path) {
            return Err(ConfigError::new("usage.path", "must be a path starting with '/'"));
        }
        let within = |value: Option<u64>, default: u64, range: RangeInclusive<u64>, field: &str| {
            let n = value.unwrap_or(default);
            if range.contains(&n) {
                return Ok(n);
            }
            let message = format!("must be between {} and {}", range.start(), range.end());
            Err(ConfigError::new(format!("usage.{field}"), message))
        };
        let flush_interval_ms =
            within(raw.flush_interval_ms, DEFAULT_FLUSH_INTERVAL_MS, FLUSH_INTERVAL_RANGE, "flush_interval_ms")?;
        let timeout_ms = within(raw.timeout_ms, DEFAULT_TIMEOUT_MS, TIMEOUT_RANGE, "timeout_ms")?;
        if timeout_ms >= flush_interval_ms {
            let message = format!("must be less than usage.flush_interval_ms ({flush_interval_ms})");
            return Err(ConfigError::new("usage.timeout_ms", message));
        }
        let max_pending_keys =
            within(raw.max_pending_keys, DEFAULT_MAX_PENDING_KEYS, PENDING_KEYS_RANGE, "max_pending_keys")?;
        let max_pending_keys = usize::try_from(max_pending_keys)
            .map_err(|_| ConfigError::new("usage.max_pending_keys", "too large for this platform"))?;
        let id = format!("usage\n{}\n{}\n{}", raw.cluster, raw.authority, raw.path);
        let namespace = hex::encode(hash_key(id.as_bytes()).get(..4).unwrap_or_default());
        Ok(UsageConfig {
            cluster: raw.cluster.clone(),
            authority: raw.authority.clone(),
            path: raw.path.clone(),
            flush_interval_ms,
            timeout_ms,
            max_pending_keys,
            namespace,
        })
    }

    /// An empty tally with this bound, its coarse time at `now_s` (wall-clock seconds).
    pub fn tally(&self, now_s: i64) -> Tally {
        Tally::new(self.max_pending_keys, now_s)
    }

    /// How often the host should tick the reporter (and hand it the workers' counts): a tenth of
    /// the flush interval, 100 ms to 1 s, so a report is made at most that late.
    pub fn tick_ms(&self) -> u64 {
        (self.flush_interval_ms / 10).clamp(100, 1_000)
    }

    /// The wait before resending a report after `failures` failed POSTs of it in a row: doubling
    /// from [`FIRST_RETRY_MS`], at most the flush interval.
    pub fn retry_after_ms(&self, failures: u32) -> u64 {
        let doublings = failures.saturating_sub(1).min(30);
        FIRST_RETRY_MS.saturating_mul(1u64 << doublings).min(self.flush_interval_ms)
    }

    /// How long a POST may go unanswered before it counts as failed.
    pub fn silence_limit_ms(&self) -> u64 {
        self.timeout_ms.saturating_add(ANSWER_SLACK_MS)
    }

    /// The shared-data entry of the lease that picks the one VM of a process that reports
    /// ([`Worker`](crate::usage::Worker)).
    pub fn lease_entry(&self) -> String {
        format!("keygate/usage/{}/lease", self.namespace)
    }

    /// The shared-data entry whose compare-and-swap tokens number the VMs that report
    /// ([`number_vm_in`](crate::live::lease::number_vm_in)).
    pub fn vmseq_entry(&self) -> String {
        format!("keygate/usage/{}/vmseq", self.namespace)
    }

    /// How long the reporting lease lasts without renewal: three ticks, at least 3 s. A VM that
    /// stalls longer loses it, and the next tick of another VM takes it.
    pub fn lease_ttl_ms(&self) -> u64 {
        self.tick_ms().saturating_mul(3).max(3_000)
    }

    /// The shared-data entry where a process's workers merge their tallies
    /// ([`deposit`](crate::usage::shared::deposit)).
    pub fn tally_entry(&self) -> String {
        format!("keygate/usage/{}/tally", self.namespace)
    }
}
