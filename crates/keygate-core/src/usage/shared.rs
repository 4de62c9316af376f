//! One process's counts in shared data, for a host whose workers are separate VMs (proxy-wasm):
//! each worker adds its tally to one entry ([`deposit`]), and the reporting VM takes what the
//! entry holds on each of its ticks ([`collect`]), both with compare-and-swap, so no count is
//! added twice or lost to a concurrent write. The entry holds a tally's bytes
//! ([`crate::usage::encoding`]), empty once collected.
//!
//! Shared data has no create-if-absent: the first write of the entry, by whichever VM comes first,
//! cannot be compare-and-swap. A host creates it empty when it is configured ([`prepare`]), well
//! before any worker deposits, so that two first deposits never race.

use crate::live::store::Store;
use crate::usage::encoding::{decode, encode, DecodeError};
use crate::usage::tally::Tally;

/// How many times a compare-and-swap is retried against other VMs' writes before giving up.
const CAS_TRIES: usize = 100;

/// Creates `entry` empty unless it exists.
pub fn prepare(store: &dyn Store, entry: &str) -> Result<(), String> {
    if store.get(entry)?.is_none() {
        store.set(entry, &[], None)?;
    }
    Ok(())
}

/// Adds `tally` to the counts in `entry`, within `tally`'s bound. On `Ok` the counts are in the
/// entry and the caller empties its tally; on `Err` nothing was added, and the caller keeps its
/// tally for its next try. `Ok(Some(_))`: the entry held bytes that are no tally (another
/// keygate's, or damaged), which are replaced.
pub fn deposit(store: &dyn Store, entry: &str, tally: &Tally) -> Result<Option<DecodeError>, String> {
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get(entry)? else {
            store.set(entry, &encode(tally), None)?;
            return Ok(None);
        };
        let (mut merged, unreadable) = match decode(&value, tally.max_keys(), tally.now_s()) {
            Ok(shared) => (shared, None),
            Err(e) => (Tally::new(tally.max_keys(), tally.now_s()), Some(e)),
        };
        merged.merge(tally.clone());
        if store.set(entry, &encode(&merged), Some(cas))? {
            return Ok(unreadable);
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}

/// Takes the counts in `entry`, leaving it empty; at most `max_keys` ids (the rest counted as
/// dropped requests), the tally's clock at `now_s`. Bytes that are no tally are taken as nothing,
/// and replaced.
pub fn collect(store: &dyn Store, entry: &str, max_keys: usize, now_s: i64) -> Result<Tally, String> {
    for _ in 0..CAS_TRIES {
        let Some((value, cas)) = store.get(entry)? else { return Ok(Tally::new(max_keys, now_s)) };
        if value.is_empty() {
            return Ok(Tally::new(max_keys, now_s));
        }
        let tally = decode(&value, max_keys, now_s).unwrap_or_else(|_| Tally::new(max_keys, now_s));
        if store.set(entry, &[], Some(cas))? {
            return Ok(tally);
        }
    }
    Err(format!("{entry}: no compare-and-swap succeeded in {CAS_TRIES} tries"))
}
