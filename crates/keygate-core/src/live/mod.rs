//! Live key sets, kept in proxy-wasm shared data and fed from a key-set endpoint.
//!
//! Everything here is host-free. The parts, each with its own module:
//!
//! - [`settings`]: the `key_set` settings, compiled, with the schedule and the entry names;
//! - [`formats`]: the manifest and shard documents and their checks;
//! - [`store`]: the shared store a host provides ([`Store`]) and what its entries hold;
//! - [`lease`]: VM numbers and the polling lease;
//! - [`memory`]: a [`Store`] in process memory, for a host without shared data;
//! - [`ids`]: record ids unique across the set;
//! - [`apply`]: what one sync writes, in an order that survives any interruption;
//! - [`host`]: the traits a host implements for the sync, and the events the sync reports;
//! - [`sync`]: the sync itself, driven by a host's ticks and answers;
//! - [`records`]: the request path's lookup of a live record, with a per-VM cache ([`LiveSet`]) or
//!   shared by threads ([`SharedLiveSet`]).
//!
//! A host implements [`Store`], [`Fetch`] and [`Clock`], forwards its ticks and the endpoint's
//! answers to a [`Syncer`], logs and counts the [`Event`]s it reports, and looks keys up in a
//! [`LiveSet`] (the proxy-wasm filter: `keygate-wasm`). The unit tests drive several syncs against
//! one fake host.
//!
//! Shared-data layout, under `keygate/<ns>/` where `<ns>` names the endpoint (so two key sets in one
//! Envoy never mix):
//!
//! | entry | value |
//! |---|---|
//! | `k<ns><hash, base64url>` (no `keygate/` prefix: there may be millions) | one key record ([`encode_key`](crate::keys::stored::encode_key)), or a one-byte tombstone for a removed key |
//! | `shard/<prefix>` | the shard's etag, and the hash and id digest of each record it holds ([`ShardIndex`]) |
//! | `widths` | every shard width whose indexes may hold records, so that no record outlives a layout change ([`WIDTHS`]) |
//! | `state` | what has loaded: version, key count, time of the last good sync ([`SyncState`]) |
//! | `generation` | changes whenever a sync changes records (VMs drop the records they decoded) |
//! | `lease` | which VM polls, until when, when the next poll is due, failures in a row, on the monotonic clock ([`Lease`]) |
//! | `vmseq` | counts the VMs numbered; the compare-and-swap token each VM consumed writing it is its number ([`number_vm`]) |

pub mod apply;
pub mod formats;
pub mod host;
pub mod ids;
pub mod lease;
pub mod memory;
pub mod records;
pub mod settings;
pub mod store;
pub mod sync;

pub use apply::{apply_shard, apply_sync, retire, write_state, FetchedShard, Retired, Write};
pub use formats::{parse_manifest, parse_shard, prefixes, Manifest, ShardRef, MAX_DEPTH};
pub use host::{Answer, Clock, Event, Fetch, Gauges, Host, LoadedSet, Sink};
pub use ids::{inline_ids, inline_place, prefix_of, shard_number, stored_position, IdIndex, INLINE, SEVERAL};
pub use lease::{
    hold_lease, hold_lease_in, number_vm, number_vm_in, release_lease, release_lease_in, seconds_since, update_lease,
    update_lease_in, Lease, VmNumber,
};
pub use memory::MemoryStore;
pub use records::{LiveSet, SharedLiveSet, MAX_CACHED};
pub use settings::{
    Fetched, KeySetConfig, RawKeySet, DEFAULT_MAX_MANIFEST_BYTES, DEFAULT_MAX_SHARD_BYTES, LAYOUT, WIDTHS,
};
pub use store::{
    decode_widths, id_digest, stale_widths, width_bit, ShardIndex, Store, StoreError, StoreOp, SyncState, PENDING_ETAG,
};
pub use sync::{Syncer, MAX_IN_FLIGHT};

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod sync_props;
#[cfg(test)]
mod sync_tests;
#[cfg(test)]
mod unit_tests;
