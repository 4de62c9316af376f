//! A fake host for the sync's unit tests: one Envoy process with several VMs, each with its own
//! [`Syncer`] and [`LiveSet`], sharing one store with Envoy's compare-and-swap semantics, one
//! monotonic clock the test moves, and a key-set endpoint that publishes what the README's
//! `publish` writes and misbehaves on demand. Simulated seconds take microseconds.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use crate::keys::{hash_key, KeyHash, KeySet, KeySource, Lookup};
use crate::layout::{self, manifest_document, Entry, Layout, Record};
use crate::live::host::{Answer, Clock, Event, Fetch, Host};
use crate::live::lease::VmNumber;
use crate::live::records::LiveSet;
use crate::live::settings::KeySetConfig;
use crate::live::store::{Store, StoreError, StoreOp};
use crate::live::sync::Syncer;
use serde_json::{json, Value};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};

/// Where [`Publication`]s put the manifest.
pub const MANIFEST: &str = "/keyset/manifest.json";

/// How often the simulation advances the clock.
pub const STEP_MS: i64 = 10;

/// Shared data as Envoy keeps it (proxy-wasm-cpp-host's `SharedData`): one token counter for the
/// process, starting at 1; a write without a token, or to an absent entry, always succeeds.
#[derive(Default)]
pub struct FakeStore {
    entries: RefCell<HashMap<String, (Vec<u8>, u32)>>,
    next_cas: Cell<u32>,
    /// Writes that still succeed before every write fails; `None`: no limit.
    writes_left: Cell<Option<usize>>,
    /// Failed writes of entries other than the lease and the VM counter.
    data_write_failures: Cell<usize>,
}

impl Store for FakeStore {
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        Ok(self.entries.borrow().get(entry).cloned())
    }

    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        if let Some(left) = self.writes_left.get() {
            if left == 0 {
                if !entry.ends_with("/lease") && !entry.ends_with("/vmseq") {
                    self.data_write_failures.set(self.data_write_failures.get() + 1);
                }
                return Err(StoreError::new(StoreOp::Write, entry, "InternalFailure"));
            }
            self.writes_left.set(Some(left - 1));
        }
        let mut entries = self.entries.borrow_mut();
        if let (Some((_, current)), Some(cas)) = (entries.get(entry), cas) {
            if *current != cas {
                return Ok(false);
            }
        }
        let token = self.next_cas.get().max(1);
        self.next_cas.set(token + 1);
        entries.insert(entry.to_string(), (value.to_vec(), token));
        Ok(true)
    }
}

impl FakeStore {
    pub fn value(&self, entry: &str) -> Option<Vec<u8>> {
        self.entries.borrow().get(entry).map(|(v, _)| v.clone())
    }

    /// After `n` more writes, every write fails (`None`: writes succeed again).
    pub fn fail_writes_after(&self, n: Option<usize>) {
        self.writes_left.set(n);
    }

    pub fn data_write_failures(&self) -> usize {
        self.data_write_failures.get()
    }
}

/// How a path of the endpoint misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// This status, with a short text body.
    Status(u16),
    /// No answer: what the host reports for a refused or reset connection (status 0).
    Down,
    /// The normal answer after this many milliseconds; past the fetch timeout, the host reports
    /// status 0 at the timeout instead.
    Slow(i64),
    /// Never answered: an answer lost on its way (the host's timeout did not fire either).
    Lost,
    /// `200` with this body and no `ETag`.
    Body(Vec<u8>),
    /// `200` announcing this many bytes.
    Huge(usize),
}

/// One request as the endpoint saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub vm: usize,
    pub at: i64,
    pub path: String,
    pub if_none_match: Option<String>,
    /// What it was answered (0: nothing).
    pub status: u16,
}

/// The key-set endpoint.
#[derive(Default)]
pub struct Origin {
    pub files: BTreeMap<String, Vec<u8>>,
    /// Whether it gives an `ETag` and answers `If-None-Match` (it does unless told otherwise).
    pub no_etags: bool,
    pub faults: HashMap<String, Fault>,
    pub every_path: Option<Fault>,
    /// The host refuses to send a request at all (an unknown cluster, say).
    pub refuse_calls: bool,
    pub requests: Vec<Request>,
}

/// An answer as the host will hand it over.
#[derive(Clone, Debug)]
pub struct Canned {
    pub path: String,
    pub status: u16,
    pub etag: Option<String>,
    pub size: usize,
    pub body: Vec<u8>,
}

impl Origin {
    /// The answer to `path`, and after how long (`None`: never).
    fn answer(&self, path: &str, if_none_match: Option<&str>, timeout_ms: i64) -> (Option<i64>, Canned) {
        let canned = |status, etag, body: Vec<u8>| Canned { path: path.into(), status, etag, size: body.len(), body };
        let normal = match self.files.get(path) {
            None => canned(404, None, b"not found\n".to_vec()),
            Some(body) => {
                let etag = (!self.no_etags).then(|| format!("\"{}\"", hex::encode(hash_key(body))));
                match etag {
                    Some(tag) if if_none_match == Some(tag.as_str()) => canned(304, Some(tag), Vec::new()),
                    etag => canned(200, etag, body.clone()),
                }
            }
        };
        match self.faults.get(path).or(self.every_path.as_ref()) {
            None => (Some(0), normal),
            Some(Fault::Status(status)) => (Some(0), canned(*status, None, format!("status {status}\n").into_bytes())),
            Some(Fault::Down) => (Some(0), canned(0, None, Vec::new())),
            Some(Fault::Slow(ms)) if *ms > timeout_ms => (Some(timeout_ms), canned(0, None, Vec::new())),
            Some(Fault::Slow(ms)) => (Some(*ms), normal),
            Some(Fault::Lost) => (None, normal),
            Some(Fault::Body(body)) => (Some(0), canned(200, None, body.clone())),
            Some(Fault::Huge(size)) => (Some(0), Canned { size: *size, ..canned(200, None, vec![b' '; 16]) }),
        }
    }
}

/// A publication as `keygate config --shards` lays it out: records sharded by the first `width` hex
/// digits of their hash, shard `<prefix or "all">.json` beside the manifest.
#[derive(Clone, Debug)]
pub struct Publication {
    pub version: String,
    /// (prefix, body, the etag the manifest lists).
    pub shards: Vec<(String, Vec<u8>, KeyHash)>,
}

impl Publication {
    /// Lays `records` out with [`crate::layout`], the one writer of the layout.
    pub fn new(records: &[Value], width: usize, version: impl ToString) -> Self {
        let texts: Vec<String> = records.iter().map(Value::to_string).collect();
        let laid: Vec<Record<'_>> =
            records.iter().zip(&texts).map(|(r, json)| Record { hash: r["hash"].as_str().unwrap(), json }).collect();
        let layout = Layout::new(&laid, width, &version.to_string()).unwrap();
        let shards = layout.shards.into_iter().map(|s| (s.prefix, s.body.clone(), hash_key(&s.body))).collect();
        Publication { version: layout.version, shards }
    }

    pub fn shard_path(prefix: &str) -> String {
        layout::shard_path(prefix)
    }

    pub fn served_path(prefix: &str) -> String {
        format!("/keyset/{}", Publication::shard_path(prefix))
    }

    /// Replaces the body of shard `prefix`; `reseal` lists its new etag in the manifest.
    pub fn set_body(&mut self, prefix: &str, body: Vec<u8>, reseal: bool) -> &mut Self {
        let shard = self.shards.iter_mut().find(|(p, _, _)| p == prefix).unwrap();
        if reseal {
            shard.2 = hash_key(&body);
        }
        shard.1 = body;
        self
    }

    pub fn manifest(&self) -> Vec<u8> {
        let paths: Vec<(String, String)> =
            self.shards.iter().map(|(prefix, _, etag)| (Publication::shard_path(prefix), hex::encode(etag))).collect();
        let entries: Vec<Entry<'_>> =
            self.shards.iter().zip(&paths).map(|((prefix, _, _), (path, etag))| Entry { prefix, path, etag }).collect();
        manifest_document(&self.version, &entries)
    }
}

/// What every VM of the process shares: the store, the clock, the endpoint, the calls in flight.
pub struct World {
    pub config: KeySetConfig,
    pub store: FakeStore,
    pub clock: Cell<i64>,
    pub origin: RefCell<Origin>,
    calls: RefCell<Vec<Call>>,
    next_token: Cell<u32>,
    /// The paths of the answers whose bodies a sync read, in order.
    pub bodies_read: RefCell<Vec<String>>,
    /// [`FakeStore::data_write_failures`] when the last good sync ended.
    pub clean_at: Cell<Option<usize>>,
}

struct Call {
    vm: usize,
    token: u32,
    /// `None`: never answered.
    due: Option<i64>,
    canned: Canned,
}

impl Clock for World {
    fn monotonic_ms(&self) -> Option<i64> {
        Some(self.clock.get())
    }
}

/// The HTTP calls of one VM.
struct Calls<'a> {
    world: &'a World,
    vm: usize,
}

impl Fetch for Calls<'_> {
    fn get(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String> {
        let world = self.world;
        assert_eq!(cluster, world.config.cluster);
        let header = |name: &str| headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string());
        assert_eq!(header(":method").as_deref(), Some("GET"));
        assert_eq!(header(":authority"), Some(world.config.authority.clone()));
        let mut origin = world.origin.borrow_mut();
        if origin.refuse_calls {
            return Err(format!("cannot call cluster {cluster:?}: BadArgument"));
        }
        let path = header(":path").unwrap();
        let if_none_match = header("if-none-match");
        let now = world.clock.get();
        let (after, canned) = origin.answer(&path, if_none_match.as_deref(), timeout_ms as i64);
        let status = if after.is_some() { canned.status } else { 0 };
        origin.requests.push(Request { vm: self.vm, at: now, path, if_none_match, status });
        let token = world.next_token.get() + 1;
        world.next_token.set(token);
        world.calls.borrow_mut().push(Call { vm: self.vm, token, due: after.map(|a| now + a), canned });
        Ok(token)
    }
}

/// An answer being handed to a VM; counts the reads of its body.
struct Handed<'a> {
    world: &'a World,
    canned: &'a Canned,
}

impl Answer for Handed<'_> {
    fn status(&self) -> u16 {
        self.canned.status
    }

    fn etag(&self) -> Option<String> {
        self.canned.etag.clone()
    }

    fn body(&self) -> Vec<u8> {
        self.world.bodies_read.borrow_mut().push(self.canned.path.clone());
        self.canned.body.clone()
    }
}

/// One VM: its number (kept across reconfigurations), its view of the set, its sync.
pub struct Vm {
    pub number: VmNumber,
    pub live: LiveSet,
    pub sync: Syncer,
    pub inline: KeySet,
    pub events: Vec<Event>,
    pub next_tick: i64,
    /// A stalled VM neither ticks nor takes answers until it resumes.
    pub stalled: bool,
    /// How far behind the world's clock this VM's reading is: the time it read the clock before
    /// another VM's write it then reads (a thread preempted between the two).
    pub clock_lag_ms: i64,
}

/// A VM's reading of the world's clock.
struct VmClock<'a> {
    world: &'a World,
    lag_ms: i64,
}

impl Clock for VmClock<'_> {
    fn monotonic_ms(&self) -> Option<i64> {
        Some(self.world.clock.get() - self.lag_ms)
    }
}

/// Keeps a VM's event, noting when a good sync ended.
fn keep(world: &World, events: &mut Vec<Event>, event: Event) {
    if matches!(event, Event::Synced { .. }) {
        world.clean_at.set(Some(world.store.data_write_failures()));
    }
    events.push(event);
}

/// One Envoy process.
pub struct Envoy {
    pub world: World,
    pub vms: Vec<Vm>,
}

/// The settings every test starts from (`settings` adds to them): a 500 ms poll, a 300 ms timeout.
pub fn config(settings: &Value) -> KeySetConfig {
    let mut raw = json!({"cluster": "keyset", "authority": "keys.internal", "path": MANIFEST,
                         "poll_interval_ms": 500, "timeout_ms": 300});
    raw.as_object_mut().unwrap().extend(settings.as_object().unwrap().clone());
    KeySetConfig::compile(&serde_json::from_value(raw).unwrap()).unwrap()
}

pub fn inline_keys(records: &[Value]) -> KeySet {
    let raw: Vec<_> = records.iter().map(|r| serde_json::from_value(r.clone()).unwrap()).collect();
    crate::keys::record::compile_keys(&raw, "keys").unwrap()
}

impl Envoy {
    /// `vms` VMs configured at time 1 000 with `settings` and the `inline` keys.
    pub fn new(vms: usize, settings: Value, inline: &[Value]) -> Self {
        let world = World {
            config: config(&settings),
            store: FakeStore::default(),
            clock: Cell::new(1_000),
            origin: RefCell::default(),
            calls: RefCell::default(),
            next_token: Cell::new(0),
            bodies_read: RefCell::default(),
            clean_at: Cell::new(None),
        };
        let mut envoy = Envoy { world, vms: Vec::new() };
        for i in 0..vms {
            let number = VmNumber::new();
            let me = number.get(&envoy.world.store, &envoy.world.config).unwrap();
            let now = envoy.world.clock.get();
            envoy.vms.push(Vm {
                number,
                live: LiveSet::new(envoy.world.config.clone()),
                sync: Syncer::new(me, now),
                inline: inline_keys(inline),
                events: Vec::new(),
                // Each VM's timer has its own phase.
                next_tick: now + 1 + 7 * i as i64,
                stalled: false,
                clock_lag_ms: 0,
            });
        }
        envoy
    }

    /// A new configuration for VM `vm` (ECDS, a new `WasmPlugin`): a fresh set and sync, the same
    /// VM number.
    pub fn reconfigure(&mut self, vm: usize, inline: &[Value]) {
        let world = &self.world;
        let v = &mut self.vms[vm];
        let me = v.number.get(&world.store, &world.config).unwrap();
        v.live = LiveSet::new(world.config.clone());
        v.sync = Syncer::new(me, world.clock.get());
        v.inline = inline_keys(inline);
    }

    pub fn publish(&self, publication: &Publication) {
        let mut origin = self.world.origin.borrow_mut();
        origin.files.clear();
        for (prefix, body, _) in &publication.shards {
            origin.files.insert(Publication::served_path(prefix), body.clone());
        }
        origin.files.insert(MANIFEST.into(), publication.manifest());
    }

    pub fn origin(&self) -> std::cell::RefMut<'_, Origin> {
        self.world.origin.borrow_mut()
    }

    pub fn now(&self) -> i64 {
        self.world.clock.get()
    }

    /// Advances the clock one step: answers now due are handed over, then the VMs whose timer
    /// fires tick.
    pub fn step(&mut self) {
        let now = self.world.clock.get() + STEP_MS;
        self.world.clock.set(now);
        self.deliver();
        for (i, vm) in self.vms.iter_mut().enumerate() {
            if vm.stalled || vm.next_tick > now {
                continue;
            }
            vm.next_tick = now + self.world.config.tick_ms() as i64;
            let calls = Calls { world: &self.world, vm: i };
            let clock = VmClock { world: &self.world, lag_ms: vm.clock_lag_ms };
            let host = Host { store: &self.world.store, fetch: &calls, clock: &clock };
            vm.sync.on_tick(&host, &vm.live, &mut |e: Event| keep(&self.world, &mut vm.events, e));
        }
        self.deliver();
    }

    /// Hands over every answer due by now, earliest first.
    fn deliver(&mut self) {
        let now = self.world.clock.get();
        loop {
            let next = {
                let mut calls = self.world.calls.borrow_mut();
                let due = calls
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.due.is_some_and(|d| d <= now) && !self.vms[c.vm].stalled)
                    .min_by_key(|(_, c)| (c.due, c.token))
                    .map(|(i, _)| i);
                due.map(|i| calls.remove(i))
            };
            let Some(call) = next else { return };
            self.hand(call.vm, call.token, &call.canned);
        }
    }

    /// Hands `canned` to VM `vm` as the answer carrying `token`.
    pub fn hand(&mut self, vm: usize, token: u32, canned: &Canned) {
        let world = &self.world;
        let v = &mut self.vms[vm];
        let calls = Calls { world, vm };
        let clock = VmClock { world, lag_ms: v.clock_lag_ms };
        let host = Host { store: &world.store, fetch: &calls, clock: &clock };
        let answer = Handed { world, canned };
        let sink = &mut |e: Event| keep(world, &mut v.events, e);
        v.sync.on_answer(&host, &v.live, &v.inline, token, canned.size, &answer, sink);
    }

    /// The calls not answered yet: (vm, token, path).
    pub fn pending(&self) -> Vec<(usize, u32, String)> {
        self.world.calls.borrow().iter().map(|c| (c.vm, c.token, c.canned.path.clone())).collect()
    }

    pub fn run_ms(&mut self, ms: i64) {
        let until = self.now() + ms;
        while self.now() < until {
            self.step();
        }
    }

    /// Runs until `done` holds, for at most `ms`; how long it took, or `None`.
    pub fn run_until(&mut self, ms: i64, done: impl Fn(&Envoy) -> bool) -> Option<i64> {
        let start = self.now();
        while !done(self) {
            if self.now() - start >= ms {
                return None;
            }
            self.step();
        }
        Some(self.now() - start)
    }

    /// Runs until some VM reports a good sync of `version`; panics after `ms`.
    pub fn run_until_synced(&mut self, version: &str, ms: i64) -> i64 {
        let seen = self.synced(version);
        self.run_until(ms, |e| e.synced(version) > seen)
            .unwrap_or_else(|| panic!("version {version} not synced in {ms} ms; events: {:#?}", self.log()))
    }

    /// Runs until VM 0's gauges show `version` loaded (the first load, say).
    pub fn run_until_loaded(&mut self, version: u64, ms: i64) -> i64 {
        self.run_until(ms, |e| e.loaded_version() == Some(version))
            .unwrap_or_else(|| panic!("version {version} not loaded in {ms} ms; events: {:#?}", self.log()))
    }

    /// The monotonic clock jumps by `ms` (back when negative); the VMs' timers run on it.
    pub fn jump(&mut self, ms: i64) {
        self.world.clock.set(self.now() + ms);
        for vm in &mut self.vms {
            vm.next_tick += ms;
        }
        for call in self.world.calls.borrow_mut().iter_mut() {
            call.due = call.due.map(|d| d + ms);
        }
    }

    /// What VM `vm` answers for the presented `key`: its id, `revoked <id>`, `unknown` or
    /// `unavailable`.
    pub fn seen(&self, vm: usize, key: &str) -> String {
        let v = &self.vms[vm];
        let hash = hash_key(key.as_bytes());
        let found = match v.inline.lookup(&hash) {
            Lookup::Found(key) => Lookup::Found(key),
            _ => v.live.find(&self.world.store, &hash).unwrap(),
        };
        match found {
            Lookup::Found(key) if key.revoked => format!("revoked {}", key.id),
            Lookup::Found(key) => key.id.clone(),
            Lookup::NotFound => "unknown".into(),
            Lookup::Unavailable => "unavailable".into(),
        }
    }

    /// [`Envoy::seen`] on every VM, which must agree.
    pub fn seen_by_all(&self, key: &str) -> String {
        let first = self.seen(0, key);
        for vm in 1..self.vms.len() {
            assert_eq!(self.seen(vm, key), first, "VM {vm} and VM 0 disagree");
        }
        first
    }

    /// Whether every VM answers `want` for `key` (a VM follows a change on its next tick).
    pub fn all_see(&self, key: &str, want: &str) -> bool {
        (0..self.vms.len()).all(|vm| self.seen(vm, key) == want)
    }

    /// Every event of every VM, as the host logs them: `vm <i>: <line>`, gauges left out.
    pub fn log(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for (i, vm) in self.vms.iter().enumerate() {
            for e in vm.events.iter().filter(|e| !matches!(e, Event::Gauges(_))) {
                lines.push(format!("vm {i}: {e}"));
            }
        }
        lines
    }

    /// Good syncs of `version`, on any VM.
    pub fn synced(&self, version: &str) -> usize {
        self.events().filter(|e| matches!(e, Event::Synced { version: v, .. } if v == version)).count()
    }

    pub fn syncs(&self) -> usize {
        self.events().filter(|e| matches!(e, Event::Synced { .. })).count()
    }

    pub fn failures(&self) -> Vec<String> {
        self.events()
            .filter_map(|e| match e {
                Event::Failed { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    fn events(&self) -> impl Iterator<Item = &Event> {
        self.vms.iter().flat_map(|vm| &vm.events)
    }

    /// The version VM 0's gauges last showed.
    pub fn loaded_version(&self) -> Option<u64> {
        self.gauges(0).and_then(|g| g.loaded).map(|l| l.version)
    }

    pub fn gauges(&self, vm: usize) -> Option<crate::live::host::Gauges> {
        self.vms[vm].events.iter().rev().find_map(|e| match e {
            Event::Gauges(g) => Some(g.clone()),
            _ => None,
        })
    }

    /// The requests for `path` so far.
    pub fn requests_for(&self, path: &str) -> Vec<Request> {
        self.world.origin.borrow().requests.iter().filter(|r| r.path == path).cloned().collect()
    }
}

/// A demo key for `id`, the same every run.
pub fn key(id: &str) -> String {
    format!("sk_live_{id}_{}", hex::encode(hash_key(format!("secret of {id}").as_bytes())))
}

pub fn hash_hex(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

/// The key record of `key(id)`.
pub fn record(id: &str) -> Value {
    json!({"id": id, "hash": hash_hex(&key(id)), "org": "org_42", "scopes": ["things:read"]})
}

pub fn revoked(id: &str) -> Value {
    let mut r = record(id);
    r["revoked"] = json!(true);
    r
}

/// An id whose key's hash starts with `prefix`: found by counting up from `base`.
pub fn id_in(base: &str, prefix: &str) -> String {
    (0..).map(|i| format!("{base}{i}")).find(|id| hash_hex(&key(id)).starts_with(prefix)).unwrap()
}

/// `n` ids whose keys' hashes start with different hex digits.
pub fn ids_in_distinct_shards(base: &str, n: usize) -> Vec<String> {
    "0123456789abcdef".chars().take(n).map(|c| id_in(&format!("{base}{c}_"), &c.to_string())).collect()
}
