//! A live key set in the native module: the core's sync ([`Syncer`]) on Envoy's main thread, over one
//! store in process memory ([`MemoryStore`]) that every worker thread reads ([`SharedLiveSet`]).
//!
//! - **One store per process and endpoint.** [`process_store`] hands every filter configuration of
//!   the same key set (same namespace) the same `Arc<MemoryStore>`, kept while one of them lives: a
//!   configuration that replaces another (ECDS, a listener update) serves the set already loaded,
//!   and the store is freed with the last configuration that uses it.
//! - **One poll per process.** Each configuration has its own [`Syncer`], numbered in the store;
//!   the core's lease lets one of them poll. A configuration that is replaced stops ticking when
//!   Envoy destroys it and lets the lease go, so the next one polls from its next tick.
//! - **The tick.** Envoy 1.40's ABI has no timer for an HTTP filter configuration, only a scheduler
//!   that runs an event on the main thread; a [`Ticker`] thread commits one every `tick_ms`, and
//!   [`crate::ffi`] stops and joins it before the configuration is freed.
//! - **The request path** reads the store on the worker thread, with no cache: a live key costs a
//!   shared read lock, one map lookup and decoding its record on every request.

use crate::filter::{ConfigHost, Level};
use keygate_core::keys::{KeyHash, KeySet, Lookup};
use keygate_core::live::{
    number_vm, release_lease, Answer, Clock, Event, Fetch, Host, KeySetConfig, LiveSet, MemoryStore, SharedLiveSet,
    Sink, Syncer,
};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Every store of the process, by key-set namespace, while a configuration holds it.
static STORES: Mutex<Vec<(String, Weak<MemoryStore>)>> = Mutex::new(Vec::new());

/// The store of the key set in `namespace`, shared by every configuration of this process that
/// reads it; `None` if the registry's lock is poisoned (a defect: the configuration is refused).
pub fn process_store(namespace: &str) -> Option<Arc<MemoryStore>> {
    let mut stores = STORES.lock().ok()?;
    stores.retain(|(_, store)| store.strong_count() > 0);
    if let Some(store) = stores.iter().find(|(ns, _)| ns == namespace).and_then(|(_, s)| s.upgrade()) {
        return Some(store);
    }
    let store = Arc::new(MemoryStore::new());
    stores.push((namespace.to_string(), Arc::downgrade(&store)));
    Some(store)
}

/// The process's monotonic clock, shared by every configuration (the lease compares its readings).
pub struct Monotonic;

impl Clock for Monotonic {
    fn monotonic_ms(&self) -> Option<i64> {
        static START: OnceLock<Instant> = OnceLock::new();
        i64::try_from(START.get_or_init(Instant::now).elapsed().as_millis()).ok()
    }
}

/// The live key set's stats (`keygate.key_set.*`), as Envoy numbered them.
#[derive(Debug, Default)]
struct LiveMetrics {
    version: Option<usize>,
    keys: Option<usize>,
    seconds_since_sync: Option<usize>,
    syncs: Option<usize>,
    sync_failures: Option<usize>,
    /// `keygate.keys`: inline and live keys together once a set has loaded.
    all_keys: Option<usize>,
}

/// What only the main thread touches: the sync and the set it follows.
#[derive(Debug)]
struct SyncSide {
    syncer: Syncer,
    live: LiveSet,
}

/// A configuration's live key set.
#[derive(Debug)]
pub struct Live {
    store: Arc<MemoryStore>,
    set: SharedLiveSet,
    sync: Mutex<SyncSide>,
    metrics: LiveMetrics,
    inline_keys: u64,
}

impl Live {
    /// Joins the process's store for `config` and numbers this configuration's sync in it. `None`
    /// (logged) refuses the configuration. `all_keys` is the `keygate.keys` gauge.
    pub fn new(
        config: KeySetConfig,
        inline_keys: u64,
        all_keys: Option<usize>,
        host: &mut dyn ConfigHost,
    ) -> Option<Live> {
        let Some(store) = process_store(&config.namespace) else {
            host.log(Level::Error, "keygate: cannot reach the process's key-set store");
            return None;
        };
        let me = match number_vm(&*store, &config) {
            Ok(me) => me,
            Err(reason) => {
                host.log(Level::Error, &format!("keygate: cannot number this configuration's sync: {reason}"));
                return None;
            }
        };
        let gauge = |host: &mut dyn ConfigHost, name: &str| {
            let id = host.define_gauge(name);
            if id.is_none() {
                host.log(Level::Warn, &format!("keygate: cannot define gauge {name}"));
            }
            id
        };
        let counter = |host: &mut dyn ConfigHost, name: &str| {
            let id = host.define_counter(name);
            if id.is_none() {
                host.log(Level::Warn, &format!("keygate: cannot define counter {name}"));
            }
            id
        };
        let metrics = LiveMetrics {
            version: gauge(host, "keygate.key_set.version"),
            keys: gauge(host, "keygate.key_set.keys"),
            seconds_since_sync: gauge(host, "keygate.key_set.seconds_since_sync"),
            syncs: counter(host, "keygate.key_set.syncs"),
            sync_failures: counter(host, "keygate.key_set.sync_failures"),
            all_keys,
        };
        let syncer = Syncer::new(me, Monotonic.monotonic_ms().unwrap_or_default());
        Some(Live {
            store,
            set: SharedLiveSet::new(config.clone()),
            sync: Mutex::new(SyncSide { syncer, live: LiveSet::new(config) }),
            metrics,
            inline_keys,
        })
    }

    /// How often the sync wants a tick.
    pub fn tick(&self) -> Duration {
        Duration::from_millis(self.set.config().tick_ms())
    }

    /// The request path's lookup, on any worker thread. A store error is logged (without the entry,
    /// which derives from the key) and refuses the request as unavailable.
    pub fn lookup(&self, hash: &KeyHash, log: &dyn crate::filter::Log) -> Lookup<'static> {
        match self.set.find(&*self.store, hash) {
            Ok(lookup) => lookup,
            Err(e) => {
                log.log(Level::Error, &format!("keygate: cannot read the key set: {}", e.status));
                Lookup::Unavailable
            }
        }
    }

    /// A tick, on the main thread.
    pub fn on_tick(&self, fetch: &dyn Fetch, host: &mut dyn ConfigHost) {
        let Ok(mut side) = self.sync.lock() else {
            return host.log(Level::Error, "keygate: the key-set sync is unusable (a defect); keeping the set loaded");
        };
        let SyncSide { syncer, live } = &mut *side;
        let envoy = Host { store: &*self.store, fetch, clock: &Monotonic };
        syncer.on_tick(&envoy, live, &mut Report { metrics: &self.metrics, inline_keys: self.inline_keys, host });
    }

    /// An answer of the key-set endpoint to the callout `token`, on the main thread.
    pub fn on_answer(
        &self,
        token: u64,
        answer: &dyn Answer,
        body_size: usize,
        inline: &KeySet,
        fetch: &dyn Fetch,
        host: &mut dyn ConfigHost,
    ) {
        // Tokens this module hands the sync always fit (see `callout_token`); another is not ours.
        let Ok(token) = u32::try_from(token) else { return };
        let Ok(mut side) = self.sync.lock() else {
            return host.log(Level::Error, "keygate: the key-set sync is unusable (a defect); keeping the set loaded");
        };
        let SyncSide { syncer, live } = &mut *side;
        let envoy = Host { store: &*self.store, fetch, clock: &Monotonic };
        let mut report = Report { metrics: &self.metrics, inline_keys: self.inline_keys, host };
        syncer.on_answer(&envoy, live, inline, token, body_size, answer, &mut report);
    }
}

impl Drop for Live {
    /// A configuration going away (replaced, or Envoy shutting down) lets the polling lease go, so
    /// that the configuration replacing it polls from its next tick on rather than once the lease
    /// expires. Best effort: a lease left held expires all the same.
    fn drop(&mut self) {
        if let Ok(side) = self.sync.lock() {
            let _ = release_lease(&*self.store, self.set.config(), side.syncer.me());
        }
    }
}

/// The sync's token for Envoy's callout id: the core counts tokens in `u32`.
pub fn callout_token(id: u64) -> Result<u32, String> {
    u32::try_from(id).map_err(|_| format!("callout id {id} past the sync's tokens"))
}

/// Logs and counts what the sync reports, as the wasm filter does.
struct Report<'a> {
    metrics: &'a LiveMetrics,
    inline_keys: u64,
    host: &'a mut dyn ConfigHost,
}

impl Report<'_> {
    fn gauge(&mut self, id: Option<usize>, value: u64) {
        if let Some(id) = id {
            self.host.set_gauge(id, value);
        }
    }
    fn count(&mut self, id: Option<usize>) {
        if let Some(id) = id {
            self.host.increment_counter(id);
        }
    }
}

impl Sink for Report<'_> {
    fn report(&mut self, event: Event) {
        let m = self.metrics;
        match &event {
            Event::Gauges(g) => {
                self.gauge(m.seconds_since_sync, g.seconds_since_sync);
                if let Some(set) = &g.loaded {
                    self.gauge(m.version, set.version);
                    self.gauge(m.keys, set.keys);
                    self.gauge(m.all_keys, set.keys + self.inline_keys);
                }
            }
            Event::Synced { changed, .. } => {
                self.count(m.syncs);
                let level = if *changed { Level::Info } else { Level::Debug };
                if self.host.enabled(level) {
                    self.host.log(level, &format!("keygate: {event}"));
                }
            }
            Event::Failed { .. } => {
                self.count(m.sync_failures);
                self.host.log(Level::Warn, &format!("keygate: {event}"));
            }
            Event::Abandoned { .. } => self.host.log(Level::Info, &format!("keygate: {event}")),
            Event::LeaseTrouble(_) | Event::ScheduleTrouble(_) => {
                self.host.log(Level::Warn, &format!("keygate: {event}"))
            }
        }
    }
}

/// One answer of a callout, from what Envoy hands the hook: the headers and the body's chunks.
pub struct CalloutAnswer<'a> {
    status: u16,
    etag: Option<String>,
    chunks: Vec<&'a [u8]>,
}

impl<'a> CalloutAnswer<'a> {
    /// `succeeded` is false when no answer came (reset, or past Envoy's buffer limit): status 0.
    pub fn new(succeeded: bool, headers: &[(&[u8], &[u8])], chunks: Vec<&'a [u8]>) -> Self {
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let status = if succeeded { header(":status").and_then(|s| s.parse().ok()).unwrap_or(0) } else { 0 };
        CalloutAnswer { status, etag: header("etag"), chunks: if succeeded { chunks } else { Vec::new() } }
    }

    /// The body's size, announced to the sync before it asks for the bytes.
    pub fn body_size(&self) -> usize {
        self.chunks.iter().map(|c| c.len()).sum()
    }
}

impl Answer for CalloutAnswer<'_> {
    fn status(&self) -> u16 {
        self.status
    }
    fn etag(&self) -> Option<String> {
        self.etag.clone()
    }
    fn body(&self) -> Vec<u8> {
        self.chunks.concat()
    }
}

/// A thread that calls `tick` every `period` until it is stopped; dropping it stops it and waits
/// for it, so nothing it uses is freed under it.
#[derive(Debug)]
pub struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    /// `None` if the thread cannot be started.
    pub fn start(period: Duration, tick: impl Fn() + Send + 'static) -> Option<Ticker> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let signal = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("keygate-tick".into())
            .spawn(move || {
                let (lock, wake) = &*signal;
                let Ok(mut stopped) = lock.lock() else { return };
                loop {
                    let next = Instant::now() + period;
                    // Sleep a whole period (spurious wake-ups included), unless stopped.
                    while !*stopped {
                        let left = next.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        stopped = match wake.wait_timeout(stopped, left) {
                            Ok((guard, _)) => guard,
                            Err(_) => return,
                        };
                    }
                    if *stopped {
                        return;
                    }
                    // Not under the lock: stopping never waits for a tick's work.
                    drop(stopped);
                    tick();
                    stopped = match lock.lock() {
                        Ok(guard) => guard,
                        Err(_) => return,
                    };
                }
            })
            .ok()?;
        Some(Ticker { stop, thread: Some(thread) })
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        if let Ok(mut stopped) = lock.lock() {
            *stopped = true;
        }
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            // The thread ends at its next look at the flag; it never panics (and a panic there
            // would only end it).
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
#[path = "live_tests.rs"]
mod tests;
