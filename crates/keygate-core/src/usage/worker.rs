//! One VM's part in usage reporting, for a host whose workers are separate VMs sharing a
//! [`Store`] (proxy-wasm): on each tick ([`Worker::on_tick`]) the VM hands its tally over, and the
//! one VM that holds the reporting lease runs the process's [`Reporter`], fed with every VM's
//! counts; the receiver's answers go to it ([`Worker::on_answer`]); a VM going away
//! ([`Worker::on_done`]) hands back what it still holds.
//!
//! - A VM that does not report adds its tally to the process's entry in shared data
//!   ([`shared::deposit`]) and empties it only when that succeeded.
//! - The VM that holds the lease ([`hold_lease_in`], the key-set sync's lease in an entry of its
//!   own) takes that entry's counts ([`shared::collect`]) and its own tally, and ticks its
//!   reporter. It creates the reporter when it takes the lease, at that moment's wall clock, with
//!   its number: batch ids never repeat, even for two reporters created in one millisecond.
//! - A reporter whose VM finds the lease held by another (it stalled past the lease) or that goes
//!   away gives its counts not yet in a report back to shared data, for the next reporter; the
//!   report it was sending, if any, is abandoned and its requests counted as dropped (it may have
//!   reached the receiver, and sending it under another batch id could count it twice).

use crate::live::host::{Answer, Sink};
use crate::live::lease::{hold_lease_in, release_lease_in};
use crate::live::store::Store;
use crate::usage::reporter::{Event, Post, Reporter, Stats};
use crate::usage::settings::UsageConfig;
use crate::usage::shared::{collect, deposit};
use crate::usage::tally::Tally;

/// The times of a tick: the host's monotonic clock (one for the process), and the wall clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub monotonic_ms: i64,
    pub wall_ms: i64,
}

impl Now {
    fn wall_s(&self) -> i64 {
        self.wall_ms.div_euclid(1_000)
    }
}

/// One VM's usage reporting.
#[derive(Debug)]
pub struct Worker {
    config: UsageConfig,
    /// This VM's number in the process ([`number_vm_in`](crate::live::lease::number_vm_in)): the
    /// lease's owner, and its reporter's number.
    me: u32,
    node: String,
    reporter: Option<Reporter>,
}

impl Worker {
    /// The part of VM number `me` of Envoy node `node`.
    pub fn new(config: UsageConfig, me: u32, node: &str) -> Self {
        Worker { config, me, node: node.to_string(), reporter: None }
    }

    pub fn config(&self) -> &UsageConfig {
        &self.config
    }

    /// This VM's number.
    pub fn me(&self) -> u32 {
        self.me
    }

    /// The reporter's stats, while this VM reports for the process.
    pub fn stats(&self) -> Option<Stats> {
        self.reporter.as_ref().map(Reporter::stats)
    }

    /// Every tick, with this VM's `tally`: hands it over (emptied once it is), then, while this VM
    /// holds the lease, ticks the reporter with every VM's counts.
    pub fn on_tick(
        &mut self,
        tally: &mut Tally,
        store: &dyn Store,
        post: &dyn Post,
        now: Now,
        sink: &mut dyn Sink<Event>,
    ) {
        tally.set_now(now.wall_s());
        let ttl = i64::try_from(self.config.lease_ttl_ms()).unwrap_or(i64::MAX);
        let held = match hold_lease_in(store, &self.config.lease_entry(), self.me, now.monotonic_ms, ttl) {
            Ok(lease) => lease.is_some(),
            Err(reason) => {
                sink.report(Event::Trouble(format!("cannot take the reporting lease: {reason}")));
                // Not knowing, a reporter carries on this once; the others hand their counts over.
                self.reporter.is_some()
            }
        };
        if !held {
            if let Some(reporter) = self.reporter.take() {
                self.retire(reporter, "the reporting lease moved to another VM", store, sink);
            }
            self.hand_over(tally, store, sink);
            return;
        }
        let entry = self.config.tally_entry();
        let mut counts = collect(store, &entry, self.config.max_pending_keys, now.wall_s()).unwrap_or_else(|reason| {
            sink.report(Event::Trouble(reason));
            self.config.tally(now.wall_s())
        });
        counts.merge(tally.take());
        let (config, node, me) = (&self.config, &self.node, self.me);
        let reporter = self.reporter.get_or_insert_with(|| Reporter::new(config.clone(), node, now.wall_ms, me));
        reporter.on_tick(now.monotonic_ms, now.wall_s(), counts, post, sink);
    }

    /// An answer carrying `token`; returns whether it was the reporter's.
    pub fn on_answer(&mut self, token: u32, answer: &dyn Answer, now: Now, sink: &mut dyn Sink<Event>) -> bool {
        match self.reporter.as_mut() {
            Some(reporter) => reporter.on_answer(now.monotonic_ms, token, answer, sink),
            None => false,
        }
    }

    /// This VM's configuration goes away (a new one replaces it, or Envoy stops): its tally and its
    /// reporter's counts not yet in a report go to shared data, and the lease is let go, so the
    /// next reporter takes them on its next tick.
    pub fn on_done(&mut self, tally: &mut Tally, store: &dyn Store, sink: &mut dyn Sink<Event>) {
        self.hand_over(tally, store, sink);
        if let Some(reporter) = self.reporter.take() {
            self.retire(reporter, "this VM's configuration went away", store, sink);
            if let Err(reason) = release_lease_in(store, &self.config.lease_entry(), self.me) {
                sink.report(Event::Trouble(format!("cannot let the reporting lease go: {reason}")));
            }
        }
    }

    /// Adds `tally` to the process's counts in shared data, emptying it once they are there.
    fn hand_over(&self, tally: &mut Tally, store: &dyn Store, sink: &mut dyn Sink<Event>) {
        if tally.is_empty() {
            return;
        }
        let entry = self.config.tally_entry();
        match deposit(store, &entry, tally) {
            Ok(unreadable) => {
                tally.take();
                if let Some(e) = unreadable {
                    sink.report(Event::Trouble(format!("{entry} held no usage tally ({e}); replaced")));
                }
            }
            // Kept for the next tick; the tally's bound holds meanwhile.
            Err(reason) => sink.report(Event::Trouble(reason)),
        }
    }

    /// Stops reporting: the counts not yet in a report go back to shared data, the report being
    /// sent is abandoned.
    fn retire(&self, reporter: Reporter, why: &str, store: &dyn Store, sink: &mut dyn Sink<Event>) {
        let (mut next, sending) = reporter.into_pending();
        if let Some((batch_id, requests)) = sending {
            sink.report(Event::Abandoned { requests, why: format!("{why} while report {batch_id} was being sent") });
        }
        self.hand_over(&mut next, store, sink);
        if !next.is_empty() {
            let why = format!("{why}, and they could not be handed back");
            sink.report(Event::Abandoned { requests: next.requests(), why });
        }
    }
}
