//! Which VM polls: each VM numbers itself once ([`VmNumber`]), then competes for a lease in shared
//! data with compare-and-swap ([`hold_lease`]); the lease also carries the schedule (when the next
//! poll is due, and the failures in a row that the backoff counts), so both survive a change of
//! holder. Every time is on the host's monotonic clock.
//!
//! The `_in` variants take the entry (and the ttl) instead of a key set's settings, for another
//! job that one VM of the process does (usage reporting: [`crate::usage::UsageConfig`]).

use crate::live::settings::KeySetConfig;
use crate::live::store::Store;
use std::cell::Cell;

/// How many times a compare-and-swap is retried against other VMs' writes before giving up.
const CAS_TRIES: usize = 100;

/// Gives this VM a number no other VM of the process has: the token of the `vmseq` entry as read
/// just before this VM's compare-and-swap write of it succeeded. A token is consumed by at most one
/// successful compare-and-swap (the write replaces it), so two VMs never get the same one, even
/// when two of them create the entry at once: shared data has no create-if-absent, and a create
/// that lands after another VM's increment only changes the entry's token.
pub fn number_vm(store: &dyn Store, config: &KeySetConfig) -> Result<u32, String> {
    number_vm_in(store, &config.vmseq_entry())
}

/// [`number_vm`] with the counter in `entry`. Every write of shared data takes its token from one
/// counter of the process, so numbers taken from different entries never meet either.
// Not inlined: one copy serves the key set's wrapper and usage reporting (the .wasm's size).
#[inline(never)]
pub fn number_vm_in(store: &dyn Store, entry: &str) -> Result<u32, String> {
    for _ in 0..CAS_TRIES {
        match store.get(entry)? {
            None => {
                store.set(entry, b"0", None)?;
            }
            Some((value, cas)) => {
                // The count of VMs numbered, for the curious reader of shared data.
                let count: u64 = std::str::from_utf8(&value).ok().and_then(|v| v.parse().ok()).unwrap_or(0);
                if store.set(entry, count.saturating_add(1).to_string().as_bytes(), Some(cas))? {
                    return Ok(cas);
                }
            }
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}

/// This VM's number, taken once ([`number_vm`]) and kept across reconfigurations (ECDS, a new
/// `WasmPlugin`), so the new configuration of a VM that held the polling lease goes on holding it.
#[derive(Debug, Default)]
pub struct VmNumber(Cell<Option<u32>>);

impl VmNumber {
    pub const fn new() -> Self {
        VmNumber(Cell::new(None))
    }

    /// This VM's number, the same one on every call once one was given.
    pub fn get(&self, store: &dyn Store, config: &KeySetConfig) -> Result<u32, String> {
        if let Some(n) = self.0.get() {
            return Ok(n);
        }
        let n = number_vm(store, config)?;
        self.0.set(Some(n));
        Ok(n)
    }
}

/// Takes or renews the polling lease for VM `me` at monotonic time `now`; returns it when this VM
/// holds it. An absent lease is created (unconditionally: shared data has no create-if-absent) and
/// first claimed on the next tick, with compare-and-swap, so a VM creating it at the same moment
/// cannot overwrite a claim.
pub fn hold_lease(store: &dyn Store, config: &KeySetConfig, me: u32, now: i64) -> Result<Option<Lease>, String> {
    hold_lease_in(store, &config.lease_entry(), me, now, config.lease_ttl_ms())
}

/// [`hold_lease`] of the lease in `entry`, lasting `ttl_ms` without renewal.
// Not inlined: one copy serves the key set's wrapper and usage reporting (the .wasm's size).
#[inline(never)]
pub fn hold_lease_in(store: &dyn Store, entry: &str, me: u32, now: i64, ttl_ms: i64) -> Result<Option<Lease>, String> {
    let Some((value, cas)) = store.get(entry)? else {
        store.set(entry, &Lease { owner: 0, expires_ms: 0, next_due_ms: 0, failures: 0 }.encode(), None)?;
        return Ok(None);
    };
    let Some(claimed) = Lease::claim(Lease::decode(&value), me, now, ttl_ms) else { return Ok(None) };
    Ok(store.set(entry, &claimed.encode(), Some(cas))?.then_some(claimed))
}

/// Changes the lease with compare-and-swap, whichever VM holds it now, keeping its holder: the
/// failure count and the schedule belong to the lease, not to a VM, so the backoff survives a move.
/// (A sync that notices the lease moved while it ran is dropped instead:
/// [`Syncer`](crate::live::sync::Syncer).)
pub fn update_lease(
    store: &dyn Store,
    config: &KeySetConfig,
    change: impl Fn(Lease) -> Lease,
) -> Result<Lease, String> {
    update_lease_in(store, &config.lease_entry(), change)
}

/// [`update_lease`] of the lease in `entry`.
// Not inlined: one copy serves the key set's wrapper and usage reporting (the .wasm's size).
#[inline(never)]
pub fn update_lease_in(store: &dyn Store, entry: &str, change: impl Fn(Lease) -> Lease) -> Result<Lease, String> {
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get(entry)? else { return Err(format!("{entry} is absent")) };
        let lease = Lease::decode(&value).ok_or_else(|| format!("{entry} is malformed"))?;
        let changed = change(lease);
        if store.set(entry, &changed.encode(), Some(cas))? {
            return Ok(changed);
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}

/// Lets the lease go, when VM `me` holds it and is going away (a native host's configuration being
/// destroyed), so that another takes it on its next tick instead of when it expires. The schedule
/// and the failure count stay with the lease.
pub fn release_lease(store: &dyn Store, config: &KeySetConfig, me: u32) -> Result<(), String> {
    release_lease_in(store, &config.lease_entry(), me)
}

/// [`release_lease`] of the lease in `entry`.
pub fn release_lease_in(store: &dyn Store, entry: &str, me: u32) -> Result<(), String> {
    update_lease_in(store, entry, |lease| if lease.owner == me { Lease { expires_ms: 0, ..lease } } else { lease })
        .map(|_| ())
}

/// Whole seconds from `since` to `now` (monotonic milliseconds), never negative.
pub fn seconds_since(since: i64, now: i64) -> u64 {
    u64::try_from(now.saturating_sub(since).max(0) / 1_000).unwrap_or(0)
}

/// The polling lease, stored as `owner,expires_ms,next_due_ms,failures`. Its times are monotonic
/// milliseconds (Envoy's steady clock, one for the whole process), so a step of the wall clock
/// moves no poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub owner: u32,
    pub expires_ms: i64,
    /// When the next sync is due (kept across a change of holder, so polls keep their pace).
    pub next_due_ms: i64,
    /// Failed syncs in a row, for the backoff.
    pub failures: u32,
}

impl Lease {
    pub fn encode(&self) -> Vec<u8> {
        format!("{},{},{},{}", self.owner, self.expires_ms, self.next_due_ms, self.failures).into_bytes()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut parts = text.split(',');
        let lease = Lease {
            owner: parts.next()?.parse().ok()?,
            expires_ms: parts.next()?.parse().ok()?,
            next_due_ms: parts.next()?.parse().ok()?,
            failures: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(lease)
    }

    /// What VM `me` writes (with compare-and-swap) to hold the lease from `now_ms`, or `None` while
    /// another VM holds an unexpired one. A lease said to last more than twice `ttl_ms` from now was
    /// written against another clock (shared data forged, or a clock that stepped back), and counts
    /// as expired. Up to twice: a VM reads the clock before the lease, and the holder may renew in
    /// between (a worker preempted there), so a lease it finds may last a little longer than
    /// `ttl_ms` from its `now_ms`.
    pub fn claim(current: Option<Lease>, me: u32, now_ms: i64, ttl_ms: i64) -> Option<Lease> {
        let furthest = now_ms.saturating_add(ttl_ms.saturating_mul(2));
        match current {
            Some(l) if l.owner != me && l.expires_ms > now_ms && l.expires_ms <= furthest => None,
            Some(l) => Some(Lease { owner: me, expires_ms: now_ms + ttl_ms, ..l }),
            None => Some(Lease { owner: me, expires_ms: now_ms + ttl_ms, next_due_ms: now_ms, failures: 0 }),
        }
    }

    /// Whether a sync is due at `now`. A due time further ahead than the longest wait ever
    /// scheduled ([`KeySetConfig::max_wait_ms`]) and a lease's ttl (the slack of [`Lease::claim`])
    /// was set against another clock, and is due now.
    pub fn due(&self, now: i64, config: &KeySetConfig) -> bool {
        let longest = i64::try_from(config.max_wait_ms()).unwrap_or(i64::MAX).saturating_add(config.lease_ttl_ms());
        now >= self.next_due_ms || self.next_due_ms.saturating_sub(now) > longest
    }

    /// The lease after a sync that failed at `now`: one more failure, and the backoff's wait.
    pub fn after_failure(self, now: i64, config: &KeySetConfig) -> Lease {
        let failures = self.failures.saturating_add(1);
        let wait = i64::try_from(config.retry_after_ms(failures)).unwrap_or(i64::MAX);
        Lease { next_due_ms: now.saturating_add(wait), failures, ..self }
    }

    /// The lease after a good sync at `now`: no failures, the next poll one interval on.
    pub fn after_success(self, now: i64, config: &KeySetConfig) -> Lease {
        let wait = i64::try_from(config.poll_interval_ms).unwrap_or(i64::MAX);
        Lease { next_due_ms: now.saturating_add(wait), failures: 0, ..self }
    }
}
