//! One worker's counts since its last flush ([`Tally`]): per key id, the requests allowed, those
//! refused by kind and when the key was last used; refusals with no key id as totals per kind; and
//! the requests no entry could be kept for. Recording a request of a key already counted is a map
//! look-up and a few additions: no allocation, no host call.

use crate::policy::Decision;
use crate::reply::DenyKind;
use std::collections::HashMap;

/// What one decision was, as usage counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome<'a> {
    /// Let through; with the key's record id when the route needed a key (a public route has none,
    /// and is not counted).
    Allowed { key_id: Option<&'a str> },
    /// Refused; with the key's record id when the key was found.
    Denied { kind: DenyKind, key_id: Option<&'a str> },
}

impl<'a> Outcome<'a> {
    /// The outcome of `decision`.
    pub fn of(decision: &'a Decision<'_>) -> Self {
        match decision {
            Decision::Allow { key_id, .. } => Outcome::Allowed { key_id: key_id.as_deref() },
            Decision::Deny(denial) => Outcome::Denied { kind: denial.kind, key_id: denial.key_id.as_deref() },
        }
    }
}

/// Whether a refusal of `kind` is counted under the key's id. A missing, malformed or unknown key
/// has no record, and a key set not loaded yet has none either: their refusals are totals, so a
/// client sending made-up keys creates no entry.
pub fn attributable(kind: DenyKind) -> bool {
    match kind {
        DenyKind::RevokedKey | DenyKind::ExpiredKey | DenyKind::InsufficientScope | DenyKind::Forbidden => true,
        DenyKind::MissingKey | DenyKind::InvalidKey | DenyKind::KeySetUnavailable => false,
    }
}

/// A count for each deny kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DenyCounts([u64; DenyKind::ALL.len()]);

impl DenyCounts {
    pub fn get(&self, kind: DenyKind) -> u64 {
        self.0.get(kind.index()).copied().unwrap_or(0)
    }

    /// Adds `n` (saturating) to the count of `kind`.
    pub fn add(&mut self, kind: DenyKind, n: u64) {
        if let Some(count) = self.0.get_mut(kind.index()) {
            *count = count.saturating_add(n);
        }
    }

    pub fn merge(&mut self, other: &DenyCounts) {
        for (kind, n) in other.iter() {
            self.add(kind, n);
        }
    }

    /// The kinds counted at least once, with their counts, in the order of [`DenyKind::ALL`].
    pub fn iter(&self) -> impl Iterator<Item = (DenyKind, u64)> + '_ {
        DenyKind::ALL.into_iter().map(|kind| (kind, self.get(kind))).filter(|(_, n)| *n > 0)
    }

    pub fn total(&self) -> u64 {
        self.0.iter().fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|n| *n == 0)
    }
}

/// The counts of one key id.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub allowed: u64,
    pub denied: DenyCounts,
    /// The wall-clock second (Unix) of its last request, as coarse as the tally's clock.
    pub last_used_s: i64,
}

impl KeyUsage {
    /// Every request counted.
    pub fn requests(&self) -> u64 {
        self.allowed.saturating_add(self.denied.total())
    }

    pub fn merge(&mut self, other: &KeyUsage) {
        self.allowed = self.allowed.saturating_add(other.allowed);
        self.denied.merge(&other.denied);
        self.last_used_s = self.last_used_s.max(other.last_used_s);
    }
}

/// The counts since the last flush, holding at most `max_keys` key ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tally {
    keys: HashMap<String, KeyUsage>,
    unattributed: DenyCounts,
    /// Requests of a key for which no entry could be kept (the bound was reached).
    dropped: u64,
    max_keys: usize,
    /// The coarse wall-clock time (Unix seconds) a request recorded now was last used at.
    now_s: i64,
}

impl Tally {
    /// An empty tally holding at most `max_keys` ids (at least one), its clock at `now_s`.
    pub fn new(max_keys: usize, now_s: i64) -> Self {
        Tally {
            keys: HashMap::new(),
            unattributed: DenyCounts::default(),
            dropped: 0,
            max_keys: max_keys.max(1),
            now_s,
        }
    }

    /// Sets the coarse clock: the host calls it on every tick with the wall clock's Unix seconds,
    /// so that recording a request reads no clock.
    pub fn set_now(&mut self, now_s: i64) {
        self.now_s = now_s;
    }

    pub fn now_s(&self) -> i64 {
        self.now_s
    }

    pub fn max_keys(&self) -> usize {
        self.max_keys
    }

    /// Counts one request.
    pub fn record(&mut self, outcome: Outcome<'_>) {
        let (id, kind) = match outcome {
            Outcome::Allowed { key_id: None } => return,
            Outcome::Allowed { key_id: Some(id) } => (id, None),
            Outcome::Denied { kind, key_id: Some(id) } if attributable(kind) => (id, Some(kind)),
            Outcome::Denied { kind, .. } => return self.unattributed.add(kind, 1),
        };
        let one = match kind {
            None => KeyUsage { allowed: 1, denied: DenyCounts::default(), last_used_s: self.now_s },
            Some(kind) => {
                let mut denied = DenyCounts::default();
                denied.add(kind, 1);
                KeyUsage { allowed: 0, denied, last_used_s: self.now_s }
            }
        };
        if let Some(usage) = self.keys.get_mut(id) {
            return usage.merge(&one);
        }
        // The bound first: a flood of keys past it allocates nothing either.
        if self.keys.len() < self.max_keys {
            self.keys.insert(id.to_string(), one);
        } else {
            self.dropped = self.dropped.saturating_add(1);
        }
    }

    /// Adds `usage` under `id`: to its entry, to a new entry while the bound allows, else to the
    /// dropped requests.
    pub(crate) fn insert(&mut self, id: String, usage: KeyUsage) {
        if let Some(kept) = self.keys.get_mut(&id) {
            return kept.merge(&usage);
        }
        if self.keys.len() < self.max_keys {
            self.keys.insert(id, usage);
        } else {
            self.dropped = self.dropped.saturating_add(usage.requests());
        }
    }

    pub(crate) fn add_unattributed(&mut self, counts: &DenyCounts) {
        self.unattributed.merge(counts);
    }

    pub(crate) fn add_dropped(&mut self, requests: u64) {
        self.dropped = self.dropped.saturating_add(requests);
    }

    /// Adds every count of `other`, within this tally's bound: the requests of a key that does not
    /// fit are counted as dropped.
    pub fn merge(&mut self, other: Tally) {
        self.unattributed.merge(&other.unattributed);
        self.dropped = self.dropped.saturating_add(other.dropped);
        if self.keys.is_empty() && other.keys.len() <= self.max_keys {
            // The common case of a reporter's first merge: take the map as it is.
            self.keys = other.keys;
            return;
        }
        for (id, usage) in other.keys {
            self.insert(id, usage);
        }
    }

    /// The counts so far, leaving this tally empty (same bound, same clock).
    pub fn take(&mut self) -> Tally {
        std::mem::replace(self, Tally::new(self.max_keys, self.now_s))
    }

    /// The counts of key `id`.
    pub fn get(&self, id: &str) -> Option<&KeyUsage> {
        self.keys.get(id)
    }

    /// Every key counted, in no particular order.
    pub fn keys(&self) -> impl ExactSizeIterator<Item = (&str, &KeyUsage)> {
        self.keys.iter().map(|(id, usage)| (id.as_str(), usage))
    }

    /// Every key counted, taken out of the tally.
    pub(crate) fn into_keys(self) -> HashMap<String, KeyUsage> {
        self.keys
    }

    /// How many key ids are counted.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether nothing at all was counted: no key, no refusal, no dropped request.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.unattributed.is_empty() && self.dropped == 0
    }

    /// The refusals with no key id, by kind.
    pub fn unattributed(&self) -> &DenyCounts {
        &self.unattributed
    }

    /// Requests of a key for which no entry could be kept.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Every request counted, dropped ones included.
    pub fn requests(&self) -> u64 {
        self.keys
            .values()
            .fold(self.unattributed.total().saturating_add(self.dropped), |sum, u| sum.saturating_add(u.requests()))
    }
}
