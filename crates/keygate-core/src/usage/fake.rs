//! A fake host for usage reporting's unit tests: one Envoy process whose workers count requests in
//! tallies of their own, a reporter ticked with their counts (merged in memory, or through a fake
//! shared store with Envoy's compare-and-swap), a receiver that misbehaves on demand, and one
//! clock the test moves. Simulated seconds take microseconds.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use crate::live::fake::FakeStore;
use crate::live::host::Answer;
use crate::reply::DenyKind;
use crate::usage::report::Report;
use crate::usage::reporter::{Event, Post, Reporter};
use crate::usage::settings::{RawUsage, UsageConfig};
use crate::usage::shared::{collect, deposit, prepare};
use crate::usage::tally::{attributable, DenyCounts, KeyUsage, Outcome, Tally};
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

/// The wall clock when the simulation starts: 2026-12-03T14:00:00Z.
pub const WALL0_S: i64 = 1_796_306_400;
/// When the reporter was created, in wall-clock milliseconds.
pub const EPOCH_MS: i64 = WALL0_S * 1_000 - 250;
pub const NODE: &str = "node-1";
/// The reporter's number in its process (a wasm host's VM number).
pub const REPORTER: u32 = 2;
/// How often the simulation advances the clock.
pub const STEP_MS: i64 = 10;

/// The settings every test starts from (`settings` adds to them): a 10 s flush, a 2 s timeout.
pub fn config(settings: &Value) -> UsageConfig {
    let mut raw = json!({"cluster": "usage", "authority": "usage.internal", "path": "/v1/usage",
                         "flush_interval_ms": 10_000, "timeout_ms": 2_000});
    for (k, v) in settings.as_object().unwrap() {
        raw[k] = v.clone();
    }
    UsageConfig::compile(&serde_json::from_value::<RawUsage>(raw).unwrap()).unwrap()
}

/// How the receiver misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This status.
    Status(u16),
    /// No answer: a refused or reset connection (status 0).
    Down,
    /// `200` after this many milliseconds; past the timeout, status 0 at the timeout instead.
    Slow(i64),
    /// Never answered: an answer lost on its way (the host's timeout did not fire either).
    Lost,
    /// An answer whose status line the host cannot read (status 0), with a junk body.
    Garbage,
    /// The host refuses to send at all (an unknown cluster, say).
    Refuse,
}

/// One POST as the receiver saw it.
#[derive(Clone, Debug)]
pub struct Posted {
    pub at: i64,
    pub cluster: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout_ms: u64,
    /// The status it was answered (0: none), once answered.
    pub answered: Option<u16>,
}

impl Posted {
    pub fn report(&self) -> Report {
        Report::parse(&self.body).unwrap()
    }
}

struct Call {
    token: u32,
    post: usize,
    /// `None`: never answered.
    due: Option<i64>,
    status: u16,
}

/// The receiver, and the host's HTTP calls to it.
#[derive(Default)]
pub struct Receiver {
    pub fault: RefCell<Option<Fault>>,
    pub posts: RefCell<Vec<Posted>>,
    calls: RefCell<Vec<Call>>,
    next_token: Cell<u32>,
    clock: Cell<i64>,
}

impl Post for Receiver {
    fn post(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        let fault = self.fault.borrow().clone();
        if fault == Some(Fault::Refuse) {
            return Err(format!("cannot call cluster {cluster:?}: BadArgument"));
        }
        let now = self.clock.get();
        let timeout = timeout_ms as i64;
        let (after, status) = match fault {
            None => (Some(0), 200),
            Some(Fault::Status(s)) => (Some(0), s),
            Some(Fault::Down | Fault::Garbage) => (Some(0), 0),
            Some(Fault::Slow(ms)) if ms > timeout => (Some(timeout), 0),
            Some(Fault::Slow(ms)) => (Some(ms), 200),
            Some(Fault::Lost) => (None, 0),
            Some(Fault::Refuse) => unreachable!(),
        };
        let mut posts = self.posts.borrow_mut();
        posts.push(Posted {
            at: now,
            cluster: cluster.into(),
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect(),
            body: body.to_vec(),
            timeout_ms,
            answered: None,
        });
        let token = self.next_token.get() + 1;
        self.next_token.set(token);
        self.calls.borrow_mut().push(Call { token, post: posts.len() - 1, due: after.map(|a| now + a), status });
        Ok(token)
    }
}

impl Receiver {
    /// Moves the receiver's clock to `now`.
    pub fn set_clock(&self, now: i64) {
        self.clock.set(now);
    }

    /// The answers due by `now` (token, status), each taken once and marked on its POST.
    pub fn take_due(&self, now: i64) -> Vec<(u32, u16)> {
        let mut calls = self.calls.borrow_mut();
        let (due, rest): (Vec<Call>, Vec<Call>) = calls.drain(..).partition(|c| c.due.is_some_and(|d| d <= now));
        *calls = rest;
        let mut posts = self.posts.borrow_mut();
        due.into_iter()
            .map(|c| {
                posts[c.post].answered = Some(c.status);
                (c.token, c.status)
            })
            .collect()
    }
}

/// An answer as the host hands it over.
pub struct Status(pub u16);

impl Answer for Status {
    fn status(&self) -> u16 {
        self.0
    }

    fn etag(&self) -> Option<String> {
        None
    }

    fn body(&self) -> Vec<u8> {
        panic!("the reporter reads no answer's body")
    }
}

/// What the test recorded, to compare with what the receiver took.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Totals {
    /// By key id: allowed, denied (last used left out).
    pub keys: BTreeMap<String, (u64, DenyCounts)>,
    pub unattributed: DenyCounts,
    pub dropped: u64,
}

impl Totals {
    fn add(&mut self, id: &str, usage: &KeyUsage) {
        let entry = self.keys.entry(id.to_string()).or_default();
        entry.0 += usage.allowed;
        entry.1.merge(&usage.denied);
    }
}

/// One Envoy process.
pub struct Envoy {
    pub config: UsageConfig,
    pub receiver: Receiver,
    pub reporter: Reporter,
    pub workers: Vec<Tally>,
    /// When set, workers deposit their tallies in shared data and the reporter collects them.
    pub store: Option<FakeStore>,
    pub events: Vec<Event>,
    pub recorded: Totals,
    now: i64,
    next_tick: i64,
}

impl Envoy {
    pub fn new(workers: usize, settings: Value) -> Self {
        let config = config(&settings);
        let reporter = Reporter::new(config.clone(), NODE, EPOCH_MS, REPORTER);
        let workers = (0..workers).map(|_| config.tally(WALL0_S)).collect();
        let mut e = Envoy {
            receiver: Receiver::default(),
            reporter,
            workers,
            store: None,
            events: Vec::new(),
            recorded: Totals::default(),
            now: 0,
            next_tick: 0,
            config,
        };
        // The first tick, when the host is configured at time 0.
        e.tick();
        e.next_tick = e.config.tick_ms() as i64;
        e
    }

    /// The same, its workers' tallies merged through shared data.
    pub fn shared(workers: usize, settings: Value) -> Self {
        let e = Envoy { store: Some(FakeStore::default()), ..Envoy::new(workers, settings) };
        prepare(e.store.as_ref().unwrap(), &e.config.tally_entry()).unwrap();
        assert_eq!(e.store.as_ref().unwrap().value(&e.config.tally_entry()), Some(Vec::new()));
        e
    }

    pub fn wall_s(&self) -> i64 {
        WALL0_S + self.now / 1_000
    }

    pub fn fault(&self, fault: Option<Fault>) {
        *self.receiver.fault.borrow_mut() = fault;
    }

    /// Worker `w` counts one outcome; the test's reckoning counts it too.
    pub fn record(&mut self, w: usize, outcome: Outcome<'_>) {
        self.workers[w].record(outcome);
        match outcome {
            Outcome::Allowed { key_id: None } => {}
            Outcome::Allowed { key_id: Some(id) } => self.recorded.keys.entry(id.into()).or_default().0 += 1,
            Outcome::Denied { kind, key_id: Some(id) } if attributable(kind) => {
                self.recorded.keys.entry(id.into()).or_default().1.add(kind, 1);
            }
            Outcome::Denied { kind, .. } => self.recorded.unattributed.add(kind, 1),
        }
    }

    pub fn allow(&mut self, w: usize, id: &str, n: usize) {
        for _ in 0..n {
            self.record(w, Outcome::Allowed { key_id: Some(id) });
        }
    }

    pub fn deny(&mut self, w: usize, kind: DenyKind, id: Option<&str>, n: usize) {
        for _ in 0..n {
            self.record(w, Outcome::Denied { kind, key_id: id });
        }
    }

    /// One step of the clock: the answers due, a tick when one is due, then the answers due
    /// at once to what the tick posted.
    pub fn step(&mut self) {
        self.now += STEP_MS;
        self.receiver.set_clock(self.now);
        self.answer();
        if self.now >= self.next_tick {
            self.next_tick = self.now + self.config.tick_ms() as i64;
            self.tick();
            self.answer();
        }
    }

    /// Hands the reporter every answer due.
    fn answer(&mut self) {
        for (token, status) in self.receiver.take_due(self.now) {
            let events = &mut self.events;
            self.reporter.on_answer(self.now, token, &Status(status), &mut |e| events.push(e));
        }
    }

    /// Every worker's tick (its clock set, its counts handed over), then the reporter's.
    fn tick(&mut self) {
        let wall = self.wall_s();
        let mut merged = self.config.tally(wall);
        for tally in &mut self.workers {
            tally.set_now(wall);
            match &self.store {
                Some(store) => {
                    deposit(store, &self.config.tally_entry(), tally).unwrap();
                    tally.take();
                }
                None => merged.merge(tally.take()),
            }
        }
        if let Some(store) = &self.store {
            merged = collect(store, &self.config.tally_entry(), self.config.max_pending_keys, wall).unwrap();
        }
        let events = &mut self.events;
        self.reporter.on_tick(self.now, wall, merged, &self.receiver, &mut |e| events.push(e));
    }

    pub fn run_ms(&mut self, ms: i64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    /// Runs until nothing is pending (every count taken by the receiver), at most `ms`; how long it took.
    pub fn run_until_delivered(&mut self, ms: i64) -> Option<i64> {
        let start = self.now;
        while self.now - start < ms {
            self.step();
            if self.reporter.idle() && self.workers_idle() {
                return Some(self.now - start);
            }
        }
        None
    }

    fn workers_idle(&self) -> bool {
        self.workers.iter().all(Tally::is_empty)
    }

    pub fn posts(&self) -> Vec<Posted> {
        self.receiver.posts.borrow().clone()
    }

    /// The reports the receiver took (answered 2xx), each batch once.
    pub fn taken(&self) -> Vec<Report> {
        let mut seen = std::collections::HashSet::new();
        self.posts()
            .iter()
            .filter(|p| p.answered.is_some_and(|s| (200..300).contains(&s)))
            .map(Posted::report)
            .filter(|r| seen.insert(r.batch_id.clone()))
            .collect()
    }

    /// What the receiver took, summed.
    pub fn received(&self) -> Totals {
        let mut totals = Totals::default();
        for report in self.taken() {
            for (id, usage) in &report.keys {
                totals.add(id, usage);
            }
            totals.unattributed.merge(&report.unattributed);
            totals.dropped += report.dropped;
        }
        totals
    }

    /// The log lines of the events so far.
    pub fn log(&self) -> Vec<String> {
        self.events.iter().map(ToString::to_string).collect()
    }
}
