//! Usage reporting: what each key did, counted on the request path and sent to a receiver once a
//! flush interval, as one JSON report per Envoy process.
//!
//! Everything here is host-free. The parts:
//!
//! - [`settings`]: the `usage` settings, compiled ([`UsageConfig`]);
//! - [`tally`]: one worker's counts since its last flush ([`Tally`]), bounded by
//!   `usage.max_pending_keys`; recording a request is at most a map update, no host call;
//! - [`encoding`]: a tally's compact bytes, to merge workers' tallies through shared data;
//! - [`shared`]: that merge, with compare-and-swap on a [`Store`](crate::live::Store);
//! - [`report`]: the report's JSON, written and read back ([`Report`]);
//! - [`reporter`]: the per-process state machine that makes a report every interval and sends it
//!   until the receiver takes it ([`Reporter`], through the host's [`Post`]);
//! - [`worker`]: one VM's part, for a host whose workers are VMs sharing a store: its tally handed
//!   over on each tick, and the reporter run by the VM that holds a lease ([`Worker`]).
//!
//! A host counts each decision in its worker's tally ([`Tally::record`] of [`Outcome::of`]), sets
//! the tally's coarse clock on each tick ([`Tally::set_now`]), gathers its workers' tallies
//! ([`Tally::merge`], or [`shared::deposit`] and [`shared::collect`]), hands them to its one
//! [`Reporter`] on each tick, forwards the receiver's answers, and logs and counts the [`Event`]s
//! (stats from [`Reporter::stats`]). Reporting never delays, fails or changes a request.

pub mod encoding;
pub mod report;
pub mod reporter;
pub mod settings;
pub mod shared;
pub mod tally;
pub mod worker;

pub use encoding::{decode, encode, DecodeError};
pub use report::{batch_id, Report, ReportError, ReportLimits, KIND_NAMES, MAX_BATCH_ID_BYTES, MAX_NODE_BYTES};
pub use reporter::{refused_for_good, Event, Post, Reporter, Stats};
pub use settings::{RawUsage, UsageConfig};
pub use tally::{attributable, DenyCounts, KeyUsage, Outcome, Tally};
pub use worker::{Now, Worker};

#[cfg(test)]
mod fake;
#[cfg(test)]
mod reporter_tests;
#[cfg(test)]
mod tally_props;
#[cfg(test)]
mod unit_tests;
#[cfg(test)]
mod worker_tests;
