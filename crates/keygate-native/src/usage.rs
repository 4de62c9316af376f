//! Usage reporting in the native module: the core's [`Tally`] and [`Reporter`], one per process and
//! receiver ([`ProcessUsage`]), fed by every worker thread and driven from Envoy's main thread.
//!
//! - **One report per process.** Every configuration of this process with the same `usage`
//!   settings shares one [`ProcessUsage`] ([`process_usage`]), kept while one of them lives: a
//!   configuration that replaces another (ECDS, a listener update) with the same settings goes on
//!   counting into the same tallies and reporting through the same reporter, so nothing is lost.
//! - **The request path** records each decision in one of [`SHARDS`] tallies, picked by the worker
//!   thread (each thread keeps its shard), under a lock that only the main thread's tick contends
//!   for: a map update, no host call.
//! - **The tick.** Each configuration's ticker ([`crate::live::Ticker`]) commits a tick on the main
//!   thread; there the shards are emptied into the reporter, which makes a report every flush
//!   interval and POSTs it with the ticking configuration's callout. Ticks of several
//!   configurations only tick the reporter more often; its schedule is its own.
//! - **Answers** come back to the configuration whose callout sent the POST. The reporter's token
//!   is this module's own, mapped to that configuration and its callout id, so an answer to
//!   another configuration's callout (a key-set fetch with the same id) is never taken for it. A
//!   POST whose configuration went away before its answer came is retried, under the same
//!   `batch_id`, once the reporter's silence limit passes.
//! - **A configuration with other usage settings** (a changed flush interval, say) gets a
//!   [`ProcessUsage`] of its own. When the last configuration of the old one goes, the counts it
//!   had not yet put in a report go to a live one for the same receiver, if any; the report it was
//!   sending, if any, is left to the receiver, neither logged nor counted as dropped (no host is
//!   at hand when the last configuration goes; it may have reached the receiver, and sending it
//!   under another `batch_id` could count it twice).
//!
//! Envoy 1.40's ABI gives a configuration no node id (only a stream, as an attribute): native
//! reports name no node (`"node": ""`), and their batch ids are unique by the reporter's creation
//! time and number.

use crate::filter::{ConfigHost, Level};
use keygate_core::live::{Answer, Clock, Sink};
use keygate_core::usage::{Event, Outcome, Post, Reporter, Tally, UsageConfig};
use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{SystemTime, UNIX_EPOCH};

/// Tallies the request path writes into; a worker thread keeps one. More shards than Envoy's
/// usual worker count keep two workers off one lock.
pub const SHARDS: usize = 16;

/// Every process usage, by settings, while a configuration holds it.
static USAGES: Mutex<Vec<Weak<ProcessUsage>>> = Mutex::new(Vec::new());
/// Numbers reporters (their batch ids) and configurations (their answers) within the process.
static REPORTERS: AtomicU32 = AtomicU32::new(0);
static CONFIGS: AtomicU64 = AtomicU64::new(0);
/// Hands each worker thread its shard.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

/// The process's usage for one receiver and one set of settings.
#[derive(Debug)]
pub struct ProcessUsage {
    config: UsageConfig,
    shards: Vec<Mutex<Tally>>,
    sending: Mutex<Sending>,
}

/// What only the main thread touches.
#[derive(Debug)]
struct Sending {
    reporter: Reporter,
    /// The POST in flight: the reporter's token for it, the configuration and its callout id.
    awaiting: Option<(u32, u64, u64)>,
    next_token: u32,
}

/// The process usage of `config`, shared by every configuration of this process with the same
/// settings; `None` if the registry's lock is poisoned (a defect: the configuration is refused).
pub fn process_usage(config: &UsageConfig) -> Option<Arc<ProcessUsage>> {
    let mut usages = USAGES.lock().ok()?;
    usages.retain(|u| u.strong_count() > 0);
    if let Some(usage) = usages.iter().filter_map(Weak::upgrade).find(|u| u.config == *config) {
        return Some(usage);
    }
    let now = wall_ms();
    let tally = || Mutex::new(config.tally(now.div_euclid(1_000)));
    let number = REPORTERS.fetch_add(1, Ordering::Relaxed);
    let usage = Arc::new(ProcessUsage {
        config: config.clone(),
        shards: (0..SHARDS).map(|_| tally()).collect(),
        sending: Mutex::new(Sending {
            reporter: Reporter::new(config.clone(), "", now, number),
            awaiting: None,
            next_token: 0,
        }),
    });
    usages.push(Arc::downgrade(&usage));
    Some(usage)
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_millis()).ok())
        .unwrap_or_default()
}

fn monotonic_ms() -> i64 {
    crate::live::Monotonic.monotonic_ms().unwrap_or_default()
}

impl ProcessUsage {
    /// Counts one decision, on a worker thread. A poisoned shard (a defect) counts nothing rather
    /// than change the request.
    pub fn record(&self, outcome: Outcome<'_>) {
        let shard = SHARD.with(|s| *s);
        if let Some(Ok(mut tally)) = self.shards.get(shard).map(Mutex::lock) {
            tally.record(outcome);
        }
    }

    /// Every tally's counts, taken; their clocks set to `now_s`.
    fn gather(&self, now_s: i64) -> Tally {
        let mut all = self.config.tally(now_s);
        for shard in &self.shards {
            // Taken under the shard's lock, merged after it: a worker waits for a swap only.
            let taken = match shard.lock() {
                Ok(mut tally) => {
                    tally.set_now(now_s);
                    tally.take()
                }
                Err(_) => continue,
            };
            all.merge(taken);
        }
        all
    }
}

impl Drop for ProcessUsage {
    /// The last configuration of these settings went away: the counts not yet in a report go to
    /// another process usage for the same receiver, if one lives.
    fn drop(&mut self) {
        let now_s = wall_ms().div_euclid(1_000);
        let mut counts = self.gather(now_s);
        let Ok(sending) = self.sending.get_mut() else { return };
        let (next, in_flight) =
            std::mem::replace(&mut sending.reporter, Reporter::new(self.config.clone(), "", 0, 0)).into_pending();
        counts.merge(next);
        // No host to log through here: a report in flight is left to the receiver, which may or
        // may not have taken it (the README says so).
        drop(in_flight);
        if counts.is_empty() {
            return;
        }
        let heir = USAGES.try_lock().ok().and_then(|usages| {
            usages.iter().filter_map(Weak::upgrade).find(|u| u.config.namespace == self.config.namespace)
        });
        if let Some(heir) = heir {
            if let Some(Ok(mut tally)) = heir.shards.first().map(Mutex::lock) {
                tally.merge(counts);
            }
        }
    }
}

/// The usage stats (`keygate.usage.*`) of one configuration, as Envoy numbered them; Envoy keeps
/// one stat per name, so every configuration's ids count into the same stats.
#[derive(Debug, Default)]
struct Metrics {
    reports_sent: Option<usize>,
    failures: Option<usize>,
    dropped: Option<usize>,
    keys_pending: Option<usize>,
}

/// One configuration's part: the process usage it counts into, and its stats.
#[derive(Debug)]
pub struct Usage {
    process: Arc<ProcessUsage>,
    /// This configuration's number, to know the answers to its own callouts.
    me: u64,
    metrics: Metrics,
}

impl Usage {
    /// `None` (logged) refuses the configuration.
    pub fn new(config: &UsageConfig, host: &mut dyn ConfigHost) -> Option<Usage> {
        let Some(process) = process_usage(config) else {
            host.log(Level::Error, "keygate: cannot reach the process's usage reporting");
            return None;
        };
        let mut define = |name: &str, gauge: bool| {
            let id = if gauge { host.define_gauge(name) } else { host.define_counter(name) };
            if id.is_none() {
                host.log(Level::Warn, &format!("keygate: cannot define stat {name}"));
            }
            id
        };
        let metrics = Metrics {
            reports_sent: define("keygate.usage.reports_sent", false),
            failures: define("keygate.usage.failures", false),
            dropped: define("keygate.usage.dropped", false),
            keys_pending: define("keygate.usage.keys_pending", true),
        };
        Some(Usage { process, me: CONFIGS.fetch_add(1, Ordering::Relaxed), metrics })
    }

    /// How often the reporter wants a tick.
    pub fn tick(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.process.config.tick_ms())
    }

    /// Counts one decision (the request path).
    pub fn record(&self, outcome: Outcome<'_>) {
        self.process.record(outcome);
    }

    /// A tick, on the main thread: the workers' counts to the reporter, which may POST through
    /// `post` (this configuration's callout).
    pub fn on_tick(&self, post: &dyn Post, host: &mut dyn ConfigHost) {
        self.on_tick_at(monotonic_ms(), wall_ms().div_euclid(1_000), post, host);
    }

    /// [`Usage::on_tick`] at monotonic `now_ms` and wall-clock `now_s` (the unit tests' clock).
    pub(crate) fn on_tick_at(&self, now_ms: i64, now_s: i64, post: &dyn Post, host: &mut dyn ConfigHost) {
        let Ok(mut sending) = self.process.sending.lock() else {
            return host.log(Level::Error, "keygate: usage reporting is unusable (a defect)");
        };
        let counts = self.process.gather(now_s);
        let token = sending.next_token.wrapping_add(1);
        let poster = Poster { post, token, sent: Cell::new(None) };
        let mut sink = UsageLog { metrics: &self.metrics, host: &mut *host };
        sending.reporter.on_tick(now_ms, now_s, counts, &poster, &mut sink);
        if let Some(callout) = poster.sent.get() {
            sending.next_token = token;
            sending.awaiting = Some((token, self.me, callout));
        }
        if let Some(id) = self.metrics.keys_pending {
            host.set_gauge(id, sending.reporter.stats().keys_pending);
        }
    }

    /// An answer to this configuration's callout `callout`, on the main thread; returns whether it
    /// was a usage POST's (then nothing else may take it).
    pub fn on_answer(&self, callout: u64, answer: &dyn Answer, host: &mut dyn ConfigHost) -> bool {
        self.on_answer_at(monotonic_ms(), callout, answer, host)
    }

    pub(crate) fn on_answer_at(
        &self,
        now_ms: i64,
        callout: u64,
        answer: &dyn Answer,
        host: &mut dyn ConfigHost,
    ) -> bool {
        let Ok(mut sending) = self.process.sending.lock() else { return false };
        let Some((token, _, _)) = sending.awaiting.filter(|&(_, me, id)| me == self.me && id == callout) else {
            return false;
        };
        sending.awaiting = None;
        let mut sink = UsageLog { metrics: &self.metrics, host: &mut *host };
        sending.reporter.on_answer(now_ms, token, answer, &mut sink);
        if let Some(id) = self.metrics.keys_pending {
            host.set_gauge(id, sending.reporter.stats().keys_pending);
        }
        true
    }
}

/// The reporter's [`Post`]: this configuration's callout, remembering its id.
struct Poster<'a> {
    post: &'a dyn Post,
    token: u32,
    sent: Cell<Option<u64>>,
}

impl Post for Poster<'_> {
    fn post(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        let callout = self.post.post(cluster, headers, body, timeout_ms)?;
        self.sent.set(Some(u64::from(callout)));
        Ok(self.token)
    }
}

/// Logs and counts what usage reporting reports, as the wasm filter does.
struct UsageLog<'a> {
    metrics: &'a Metrics,
    host: &'a mut dyn ConfigHost,
}

impl UsageLog<'_> {
    fn add(&mut self, id: Option<usize>, n: u64) {
        if let Some(id) = id {
            self.host.add_counter(id, n);
        }
    }
}

impl Sink<Event> for UsageLog<'_> {
    fn report(&mut self, event: Event) {
        let m = self.metrics;
        match &event {
            Event::Sent { .. } => {
                self.add(m.reports_sent, 1);
                if self.host.enabled(Level::Debug) {
                    self.host.log(Level::Debug, &format!("keygate: {event}"));
                }
                return;
            }
            Event::Failed { .. } => self.add(m.failures, 1),
            Event::Dropped { requests } | Event::Refused { requests, .. } | Event::Abandoned { requests, .. } => {
                self.add(m.dropped, *requests)
            }
            Event::Trouble(_) => {}
        }
        self.host.log(Level::Warn, &format!("keygate: {event}"));
    }
}

#[cfg(test)]
#[path = "usage_tests.rs"]
mod tests;
