//! The proxy-wasm glue: the only module that talks to the host. It reads the configuration, gathers
//! each request's headers in one host call, asks [`Policy::decide`], and carries the decision out.
//!
//! Host calls are made through `proxy_wasm::hostcalls`, whose results are handled here, rather than
//! through the SDK's trait defaults, which unwrap them.

use keygate_core::keys::stored::decode_key;
use keygate_core::keys::{Key, KeyHash, KeyRef, KeySource, Lookup};
use keygate_core::live::{
    apply_shard, apply_sync, decode_widths, hold_lease, inline_ids, inline_place, number_vm, parse_manifest,
    parse_shard, prefix_of, prefixes, retire, seconds_since, shard_number, stale_widths, stored_position, update_lease,
    width_bit, write_state, Fetched, FetchedShard, IdIndex, KeySetConfig, Manifest, Retired, ShardIndex, ShardRef,
    Store, SyncState, INLINE, MAX_IN_FLIGHT, SEVERAL,
};
use keygate_core::plugin::Plugin;
use keygate_core::policy::{Decision, Policy, RequestView};
use keygate_core::reply::DenyKind;
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType, Status};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

/// Counters and gauges, defined once per VM. Envoy shows them as `wasmcustom.keygate.*`.
#[derive(Debug, Default)]
struct Metrics {
    allowed: Option<u32>,
    denied: Vec<Option<u32>>,
    keys: Option<u32>,
    live: Option<LiveMetrics>,
}

/// The live key set's stats, defined only when one is configured.
#[derive(Debug, Default)]
struct LiveMetrics {
    version: Option<u32>,
    keys: Option<u32>,
    seconds_since_sync: Option<u32>,
    syncs: Option<u32>,
    sync_failures: Option<u32>,
}

fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            warn!("keygate: cannot define metric {name}: {status:?}");
            None
        }
    }
}

impl Metrics {
    fn define(live: bool) -> Self {
        Metrics {
            allowed: define_metric(MetricType::Counter, "keygate.allowed"),
            denied: DenyKind::ALL
                .iter()
                .map(|k| define_metric(MetricType::Counter, &format!("keygate.denied.{}", k.name())))
                .collect(),
            keys: define_metric(MetricType::Gauge, "keygate.keys"),
            live: live.then(|| LiveMetrics {
                version: define_metric(MetricType::Gauge, "keygate.key_set.version"),
                keys: define_metric(MetricType::Gauge, "keygate.key_set.keys"),
                seconds_since_sync: define_metric(MetricType::Gauge, "keygate.key_set.seconds_since_sync"),
                syncs: define_metric(MetricType::Counter, "keygate.key_set.syncs"),
                sync_failures: define_metric(MetricType::Counter, "keygate.key_set.sync_failures"),
            }),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            // A failed stat update must not change the answer to the request.
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    fn record(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// What every request context shares: the compiled policy and the metric ids.
struct Shared {
    policy: Policy,
    /// Where the live key set comes from, if one is configured.
    key_set: Option<KeySetConfig>,
    metrics: Metrics,
    /// Set once the live key set has been seen loaded; a loaded set never unloads.
    live_loaded: Cell<bool>,
    /// Records of the live set this VM has decoded, for the key-set generation it last saw.
    cache: RefCell<RecordCache>,
}

/// Decoded live records, so that a key in use costs no shared-data read per request. Emptied when
/// the polling VM publishes a new generation (checked on every tick) and when it grows too large.
#[derive(Default)]
struct RecordCache {
    generation: Option<Vec<u8>>,
    records: HashMap<KeyHash, Rc<Key>>,
}

/// Most records one VM keeps decoded.
const MAX_CACHED: usize = 10_000;

impl RecordCache {
    /// Follows the generation in shared data: a new one empties the cache.
    fn follow(&mut self, config: &KeySetConfig) {
        let current = match hostcalls::get_shared_data(&config.generation_entry()) {
            Ok((value, _)) => value,
            Err(_) => None,
        };
        if current != self.generation {
            self.records.clear();
            self.generation = current;
        }
    }

    fn insert(&mut self, hash: KeyHash, key: Rc<Key>) {
        if self.records.len() >= MAX_CACHED {
            self.records.clear();
        }
        self.records.insert(hash, key);
    }
}

impl Shared {
    fn live_loaded(&self, live: &KeySetConfig) -> bool {
        if !self.live_loaded.get() && matches!(hostcalls::get_shared_data(&live.state_entry()), Ok((Some(_), _))) {
            self.live_loaded.set(true);
        }
        self.live_loaded.get()
    }
}

/// Keys for one request: the inline set first, then this key's own record in shared data.
struct Keys<'a>(&'a Shared);

impl KeySource for Keys<'_> {
    fn lookup(&self, hash: &KeyHash) -> Lookup<'_> {
        let shared = self.0;
        if let found @ Lookup::Found(_) = shared.policy.keys.lookup(hash) {
            return found;
        }
        let Some(live) = &shared.key_set else { return Lookup::NotFound };
        if let Some(key) = shared.cache.borrow().records.get(hash) {
            return Lookup::Found(KeyRef::Shared(Rc::clone(key)));
        }
        match hostcalls::get_shared_data(&live.key_entry(hash)) {
            Ok((Some(bytes), _)) => match decode_key(&bytes) {
                Some(key) => {
                    let key = Rc::new(key);
                    shared.cache.borrow_mut().insert(*hash, Rc::clone(&key));
                    Lookup::Found(KeyRef::Shared(key))
                }
                None => Lookup::NotFound,
            },
            Ok((None, Some(_))) => Lookup::NotFound,
            Ok((None, None)) if shared.live_loaded(live) => Lookup::NotFound,
            Ok((None, None)) => Lookup::Unavailable,
            Err(status) => {
                error!("keygate: cannot read the key set: {status:?}");
                Lookup::Unavailable
            }
        }
    }
}

/// The plugin's root context: compiles the configuration, hands it to each request, and keeps the
/// live key set fresh when one is configured.
#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    live: Option<Live>,
}

/// This VM's part in keeping the live key set.
struct Live {
    /// This VM's number, for the lease.
    me: u32,
    configured_ms: i64,
    sync: Option<SyncRun>,
    /// The digests of the inline keys' ids, once a sync needed them.
    inline_ids: Option<Rc<HashSet<u32>>>,
}

/// One sync in progress (this VM holds the lease).
struct SyncRun {
    started_ms: i64,
    /// When the last answer of this sync arrived (or it started).
    last_answer_ms: i64,
    previous: SyncState,
    manifest_token: Option<u32>,
    manifest: Option<Manifest>,
    manifest_etag: Option<String>,
    /// Set when the manifest's shard layout is not the only one in shared data: what the others hold.
    retired: Option<Retired>,
    /// The ids of the set being built, to refuse one loaded twice.
    ids: IdIndex,
    queue: Vec<(ShardRef, Option<ShardIndex>)>,
    in_flight: HashMap<u32, (ShardRef, Option<ShardIndex>)>,
    fetched: Vec<FetchedShard>,
    /// No set has loaded yet, so there is no last good one to keep: each shard is written as it
    /// arrives (a VM's memory never shrinks, and a first load may be the whole set).
    first_load: bool,
    /// Shards fetched and checked in this sync.
    shards_fetched: usize,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(shared) = self.shared.clone() else { return };
        let Some(config) = &shared.key_set else { return };
        let headers = hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let status = header(":status").and_then(|s| s.parse::<u16>().ok()).unwrap_or(0);
        // The size first: a body past its limit is never copied into the VM, let alone parsed.
        if let Some(reason) = self.refuse_body(config, token, body_size) {
            self.sync_failed(&shared, config, &reason);
            return;
        }
        let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => Vec::new(),
        };
        let outcome = self.on_fetched(&shared, config, token, status, header("etag"), &body);
        if let Err(reason) = outcome {
            self.sync_failed(&shared, config, &reason);
        }
    }
}

/// Follows Envoy's log level for the `wasm` component, so that a `debug!` below it costs a comparison,
/// not a formatted message sent to the host and dropped there.
fn follow_envoy_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// How often a VM without a live key set wakes, to follow Envoy's log level.
const IDLE_TICK: Duration = Duration::from_secs(5);

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_envoy_log_level();
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("keygate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        let Plugin { policy, key_set } = match Plugin::from_json(&text) {
            Ok(plugin) => plugin,
            Err(e) => {
                error!("keygate: invalid configuration: {e}");
                return false;
            }
        };
        let metrics = Metrics::define(key_set.is_some());
        Metrics::record(metrics.keys, policy.keys.len() as u64);
        info!("keygate: configured with {} inline keys, {} routes", policy.keys.len(), policy.routes.len());
        self.live = None;
        if key_set.is_none() {
            if let Err(status) = hostcalls::set_tick_period(IDLE_TICK) {
                warn!("keygate: cannot set the tick period: {status:?}");
            }
        }
        if let Some(config) = &key_set {
            let me = match vm_number(config) {
                Ok(me) => me,
                Err(reason) => {
                    error!("keygate: cannot number this VM in shared data: {reason}");
                    return false;
                }
            };
            if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(config.tick_ms())) {
                error!("keygate: cannot set the tick period: {status:?}");
                return false;
            }
            self.live =
                Some(Live { me, configured_ms: monotonic_ms().unwrap_or_default(), sync: None, inline_ids: None });
        }
        self.shared = Some(Rc::new(Shared {
            policy,
            key_set,
            metrics,
            live_loaded: Cell::new(false),
            cache: RefCell::default(),
        }));
        true
    }

    fn on_tick(&mut self) {
        follow_envoy_log_level();
        let Some(shared) = self.shared.clone() else { return };
        let Some(config) = &shared.key_set else { return };
        let Some(now) = monotonic_ms() else { return };
        shared.cache.borrow_mut().follow(config);
        self.refresh_gauges(&shared, config, now);
        let Some(live) = self.live.as_mut() else { return };
        // Renewed on every tick, also while a sync runs: a large first load outlasts the lease.
        let lease = match hold_lease(&HostStore, config, live.me, now) {
            Ok(lease) => lease,
            Err(reason) => {
                warn!("keygate: cannot take the key-set lease: {reason}");
                None
            }
        };
        if let Some(run) = &live.sync {
            // Envoy answers every call by its timeout; this only guards against a lost answer.
            let limit = i64::try_from(config.timeout_ms).unwrap_or(i64::MAX).saturating_mul(4).saturating_add(5_000);
            if now - run.last_answer_ms > limit {
                self.sync_failed(&shared, config, "no answer from the key-set endpoint");
            }
            return;
        }
        if lease.is_some_and(|l| l.due(now, config)) {
            self.start_sync(&shared, config, now);
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { shared: self.shared.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Why an answer of the sync in progress is not read: its body is larger than its limit.
    fn refuse_body(&self, config: &KeySetConfig, token: u32, size: usize) -> Option<String> {
        let run = self.live.as_ref()?.sync.as_ref()?;
        if run.manifest_token == Some(token) {
            return config.refuse_body(Fetched::Manifest, size);
        }
        let (shard, _) = run.in_flight.get(&token)?;
        config.refuse_body(Fetched::Shard(&shard.prefix), size)
    }

    fn refresh_gauges(&self, shared: &Shared, config: &KeySetConfig, now: i64) {
        let Some(m) = &shared.metrics.live else { return };
        let state = read_state(config);
        let since = state.as_ref().map(|s| s.synced_ms).or(self.live.as_ref().map(|l| l.configured_ms));
        Metrics::record(m.seconds_since_sync, since.map_or(0, |at| seconds_since(at, now)));
        if let Some(state) = state {
            Metrics::record(m.version, state.version_number().unwrap_or(0));
            Metrics::record(m.keys, state.keys);
            Metrics::record(shared.metrics.keys, state.keys + shared.policy.keys.len() as u64);
        }
    }

    fn start_sync(&mut self, shared: &Shared, config: &KeySetConfig, now: i64) {
        let state = read_state(config);
        let first_load = state.is_none();
        let previous = state.unwrap_or_default();
        let mut headers =
            vec![(":method", "GET"), (":path", config.path.as_str()), (":authority", config.authority.as_str())];
        if let Some(etag) = &previous.manifest_etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        match dispatch(config, headers) {
            Ok(token) => {
                if let Some(live) = self.live.as_mut() {
                    live.sync = Some(SyncRun {
                        started_ms: now,
                        last_answer_ms: now,
                        previous,
                        manifest_token: Some(token),
                        manifest: None,
                        manifest_etag: None,
                        retired: None,
                        ids: IdIndex::default(),
                        queue: Vec::new(),
                        in_flight: HashMap::new(),
                        fetched: Vec::new(),
                        first_load,
                        shards_fetched: 0,
                    });
                }
            }
            Err(reason) => self.sync_failed(shared, config, &reason),
        }
    }

    /// Handles one answer of the sync in progress; `Err` abandons the sync.
    fn on_fetched(
        &mut self,
        shared: &Shared,
        config: &KeySetConfig,
        token: u32,
        status: u16,
        etag: Option<String>,
        body: &[u8],
    ) -> Result<(), String> {
        let Some(live) = self.live.as_mut() else { return Ok(()) };
        let Some(run) = live.sync.as_mut() else { return Ok(()) };
        run.last_answer_ms = monotonic_ms().unwrap_or(run.last_answer_ms);
        if run.manifest_token == Some(token) {
            run.manifest_token = None;
            match status {
                304 if run.previous.manifest_etag.is_some() => {
                    run.manifest = None;
                    return self.finish(shared, config);
                }
                200 => {}
                0 => return Err("manifest: no answer (down, refused or timed out)".into()),
                other => return Err(format!("manifest: HTTP status {other}")),
            }
            let manifest = parse_manifest(body).map_err(|e| e.to_string())?;
            let width = manifest.width();
            let mask = match hostcalls::get_shared_data(&config.widths_entry()) {
                Ok((Some(bytes), _)) => decode_widths(&bytes),
                _ => 0,
            };
            if mask & width_bit(width) == 0 {
                // Before any index of this width is written, so that none is ever left unlisted.
                write_shared(&config.widths_entry(), (mask | width_bit(width)).to_string().as_bytes())?;
            }
            let inline = live.inline_ids.get_or_insert_with(|| Rc::new(inline_ids(&shared.policy.keys)));
            run.ids = IdIndex::new(Rc::clone(inline));
            let stale = stale_widths(mask, run.previous.width, width);
            if !stale.is_empty() {
                // Another layout holds records (the loaded one, or one a failed first load left):
                // every shard is fetched, and every key of the others is reconsidered.
                let mut retired = Retired::default();
                for prefix in stale.into_iter().flat_map(prefixes) {
                    retired.hashes.extend(read_shard_index(config, &prefix).map(|i| i.hashes).unwrap_or_default());
                    retired.prefixes.push(prefix);
                }
                // Each shard with the index its own width holds now: what that index lists and the new
                // shard lacks is retired too (a failed sync at another width must not spare it).
                run.queue.extend(manifest.shards.iter().map(|s| (s.clone(), read_shard_index(config, &s.prefix))));
                run.retired = Some(retired);
            } else {
                for shard in &manifest.shards {
                    let index = read_shard_index(config, &shard.prefix);
                    match index {
                        Some(i) if i.etag == shard.etag => run.ids.add(shard_number(&shard.prefix), i.ids),
                        index => run.queue.push((shard.clone(), index)),
                    }
                }
            }
            run.manifest = Some(manifest);
            run.manifest_etag = etag;
        } else if let Some((shard, previous)) = run.in_flight.remove(&token) {
            if status != 200 {
                let what = if status == 0 { "no answer".to_string() } else { format!("HTTP status {status}") };
                return Err(format!("shard {:?} ({}): {what}", shard.prefix, shard.path));
            }
            let keys = parse_shard(&shard, body).map_err(|e| e.to_string())?;
            let width = shard.prefix.len();
            let fetched_so_far = &run.fetched;
            let in_shard = |prefix: String, digest: u32, id: &str| {
                let position = match fetched_so_far.iter().find(|f| f.shard.prefix == prefix) {
                    Some(f) => f.position_of(digest, id),
                    None => stored_position(config, &HostStore, &prefix, digest, id),
                };
                position.map(|i| format!("shard {prefix:?} keys[{i}].id"))
            };
            let place_of = |place: u32, digest: u32, id: &str| match place {
                INLINE => inline_place(&shared.policy.keys, id),
                SEVERAL => prefixes(width).find_map(|prefix| in_shard(prefix, digest, id)),
                n => in_shard(prefix_of(n, width), digest, id),
            };
            run.ids.check(&shard, &keys, place_of).map_err(|e| e.to_string())?;
            let fetched = FetchedShard::new(shard, keys, previous, &shared.policy.keys).map_err(|e| e.to_string())?;
            run.ids.add(shard_number(&fetched.shard.prefix), fetched.ids.iter().copied());
            run.shards_fetched += 1;
            if run.first_load {
                apply_shard(config, &fetched, &mut write_shared)?;
            } else {
                run.fetched.push(fetched);
            }
        } else {
            return Ok(());
        }
        while run.in_flight.len() < MAX_IN_FLIGHT {
            let Some((shard, previous)) = run.queue.pop() else { break };
            let path = config.shard_request_path(&shard.path);
            let headers = vec![(":method", "GET"), (":path", path.as_str()), (":authority", config.authority.as_str())];
            let token = dispatch(config, headers)?;
            run.in_flight.insert(token, (shard, previous));
        }
        if run.in_flight.is_empty() && run.queue.is_empty() {
            return self.finish(shared, config);
        }
        Ok(())
    }

    /// Applies the sync in progress to shared data, then schedules the next poll.
    fn finish(&mut self, shared: &Shared, config: &KeySetConfig) -> Result<(), String> {
        let Some(run) = self.live.as_mut().and_then(|l| l.sync.take()) else { return Ok(()) };
        let now = monotonic_ms().unwrap_or(run.started_ms);
        let records_changed = run.shards_fetched > 0 || run.retired.is_some();
        let changed = run.manifest.as_ref().is_some_and(|m| records_changed || m.version != run.previous.version);
        let summary = match &run.manifest {
            None => {
                let state = SyncState { synced_ms: now, ..run.previous.clone() };
                write_shared(&config.state_entry(), &state.encode())?;
                format!("version {} unchanged", state.version)
            }
            Some(manifest) if run.first_load => {
                // The shards are written; the state, last, counts what their indexes hold.
                let indexes: Vec<ShardIndex> =
                    manifest.shards.iter().filter_map(|s| read_shard_index(config, &s.prefix)).collect();
                let keys = indexes.iter().map(|i| i.hashes.len() as u64).sum();
                if let Some(retired) = &run.retired {
                    // What another layout left (a first load that failed part-way, say) and this
                    // set lacks stops working before the set counts as loaded.
                    let kept = indexes.iter().flat_map(|i| &i.hashes).collect();
                    retire(config, retired, &kept, manifest.width(), &mut write_shared)?;
                }
                write_state(config, manifest, keys, run.manifest_etag.clone(), now, &mut write_shared)?;
                write_shared(&config.generation_entry(), now.to_string().as_bytes())?;
                format!("version {} loaded, {} shards fetched", manifest.version, run.shards_fetched)
            }
            Some(manifest) => {
                apply_sync(
                    config,
                    manifest,
                    &run.fetched,
                    run.retired.as_ref(),
                    &run.previous,
                    run.manifest_etag.clone(),
                    now,
                    &mut write_shared,
                )?;
                if records_changed {
                    // Records changed: every VM empties its cache on its next tick.
                    write_shared(&config.generation_entry(), now.to_string().as_bytes())?;
                    shared.cache.borrow_mut().follow(config);
                }
                format!("version {} loaded, {} shards fetched", manifest.version, run.shards_fetched)
            }
        };
        shared.live_loaded.set(true);
        if let Err(reason) = update_lease(&HostStore, config, |l| l.after_success(now, config)) {
            warn!("keygate: cannot schedule the next key-set poll: {reason}");
        }
        if let Some(m) = &shared.metrics.live {
            Metrics::bump(m.syncs);
        }
        self.refresh_gauges(shared, config, now);
        if changed {
            info!("keygate: key set {summary}");
        } else {
            debug!("keygate: key set {summary}");
        }
        Ok(())
    }

    /// Abandons the sync in progress: nothing it fetched is applied, and the next try backs off.
    fn sync_failed(&mut self, shared: &Shared, config: &KeySetConfig, reason: &str) {
        let Some(live) = self.live.as_mut() else { return };
        live.sync = None;
        let now = monotonic_ms().unwrap_or_default();
        let wait = match update_lease(&HostStore, config, |l| l.after_failure(now, config)) {
            Ok(lease) => lease.next_due_ms.saturating_sub(now),
            Err(reason) => {
                warn!("keygate: cannot schedule the next key-set poll: {reason}");
                i64::try_from(config.poll_interval_ms).unwrap_or(i64::MAX)
            }
        };
        if let Some(m) = &shared.metrics.live {
            Metrics::bump(m.sync_failures);
        }
        let version =
            read_state(config).map_or_else(|| "none loaded yet".to_string(), |s| format!("version {}", s.version));
        warn!("keygate: key-set sync failed: {reason}; keeping {version}; next try in {wait} ms");
    }
}

fn dispatch(config: &KeySetConfig, headers: Vec<(&str, &str)>) -> Result<u32, String> {
    hostcalls::dispatch_http_call(&config.cluster, headers, None, vec![], Duration::from_millis(config.timeout_ms))
        .map_err(|status| format!("cannot call cluster {:?}: {status:?}", config.cluster))
}

fn write_shared(entry: &str, value: &[u8]) -> Result<(), String> {
    hostcalls::set_shared_data(entry, Some(value), None).map_err(|status| format!("cannot write {entry}: {status:?}"))
}

fn read_state(config: &KeySetConfig) -> Option<SyncState> {
    match hostcalls::get_shared_data(&config.state_entry()) {
        Ok((Some(bytes), _)) => SyncState::decode(&bytes),
        _ => None,
    }
}

fn read_shard_index(config: &KeySetConfig, prefix: &str) -> Option<ShardIndex> {
    match hostcalls::get_shared_data(&config.shard_entry(prefix)) {
        Ok((Some(bytes), _)) => ShardIndex::decode(&bytes),
        _ => None,
    }
}

/// Shared data through the host.
struct HostStore;

impl Store for HostStore {
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, String> {
        match hostcalls::get_shared_data(entry) {
            Ok((value, Some(cas))) => Ok(Some((value.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(status) => Err(format!("cannot read {entry}: {status:?}")),
        }
    }

    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, String> {
        match hostcalls::set_shared_data(entry, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(format!("cannot write {entry}: {status:?}")),
        }
    }
}

thread_local! {
    /// This VM's number: kept across reconfigurations (ECDS, a new `WasmPlugin`), so the new root
    /// context of a VM that held the polling lease goes on holding it.
    static VM_NUMBER: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Gives this VM a number no other VM of this Envoy process has, the same one on every call.
fn vm_number(config: &KeySetConfig) -> Result<u32, String> {
    if let Some(n) = VM_NUMBER.with(Cell::get) {
        return Ok(n);
    }
    let n = number_vm(&HostStore, config)?;
    VM_NUMBER.with(|cell| cell.set(Some(n)));
    Ok(n)
}

/// One request.
struct Request {
    shared: Option<Rc<Shared>>,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            // Never configured: refuse rather than let anything through.
            return send_internal_error("keygate is not configured");
        };
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(status) => {
                error!("keygate: cannot read request headers: {status:?}");
                return send_internal_error("request headers unreadable");
            }
        };
        #[cfg(feature = "panic-probe")]
        if headers.iter().any(|(n, _)| n == "x-keygate-panic-probe") {
            // Test builds only: crash the VM the way a panic does (panic = "abort"), to prove that
            // Envoy's failure_policy never lets the request through.
            std::process::abort();
        }
        #[cfg(feature = "panic-probe")]
        for (_, value) in headers.iter().filter(|(n, _)| n == "x-keygate-probe-shared") {
            // Test builds only: write `<entry> <value in hex>` into shared data, so a test can plant
            // what another clock (or a bug) would have left there.
            let text = String::from_utf8_lossy(value);
            if let Some((entry, value)) = text.split_once(' ').and_then(|(e, v)| Some((e, hex::decode(v).ok()?))) {
                if let Err(status) = hostcalls::set_shared_data(entry, Some(&value), None) {
                    error!("keygate: probe cannot write {entry}: {status:?}");
                }
            }
        }
        let request = RequestView::from_headers(&headers);
        match shared.policy.decide(&Keys(&shared), &request, &now_ms) {
            Decision::Allow { edits, key_id } => {
                for name in &edits.remove {
                    if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name.as_ref()) {
                        error!("keygate: cannot remove header {name}: {status:?}");
                        return send_internal_error("header edit failed");
                    }
                }
                for (name, value) in &edits.set {
                    if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
                        error!("keygate: cannot set header {name}: {status:?}");
                        return send_internal_error("header edit failed");
                    }
                }
                if let Some(id) = key_id {
                    debug!("keygate: allowed key {id}");
                }
                Metrics::bump(shared.metrics.allowed);
                Action::Continue
            }
            Decision::Deny(denial) => {
                let request_id = headers
                    .iter()
                    .find(|(n, _)| n == "x-request-id")
                    .map(|(_, v)| String::from_utf8_lossy(v))
                    .unwrap_or_default();
                let reply = shared.policy.replies.render(denial.kind, &denial.missing_scopes, &request_id);
                match &denial.key_id {
                    Some(id) => debug!("keygate: denied {} for key {id}", denial.kind.name()),
                    None => debug!("keygate: denied {}", denial.kind.name()),
                }
                Metrics::bump(shared.metrics.denied.get(denial.kind.index()).copied().flatten());
                let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                if let Err(status) =
                    hostcalls::send_http_response(u32::from(reply.status), headers, Some(reply.body.as_bytes()))
                {
                    error!("keygate: cannot send the {} reply: {status:?}", reply.status);
                }
                Action::Pause
            }
        }
    }
}

/// Envoy's steady clock in milliseconds, through WASI's `clock_time_get` (proxy-wasm 0.2 has no
/// monotonic clock of its own; Envoy answers it with its dispatcher's monotonic time). One clock for
/// every VM of the process that no wall-clock step moves: the polling schedule, the lease and the
/// sync age use it. Falls back to the wall clock should the host refuse.
fn monotonic_ms() -> Option<i64> {
    #[cfg(target_arch = "wasm32")]
    {
        #[link(wasm_import_module = "wasi_snapshot_preview1")]
        extern "C" {
            fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
        }
        const MONOTONIC: u32 = 1;
        let mut nanos: u64 = 0;
        // SAFETY: WASI's clock_time_get takes a clock id, a precision and a pointer to 8 writable
        // bytes of this module's memory, and writes only there; `nanos` is a live, aligned u64.
        let errno = unsafe { clock_time_get(MONOTONIC, 1_000_000, &mut nanos) };
        if errno == 0 {
            return i64::try_from(nanos / 1_000_000).ok();
        }
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        // Off wasm (the host build of this module, which never runs a sync): the process's clock.
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        return i64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).ok();
    }
    #[allow(unreachable_code)] // reached on wasm when the host refuses the clock
    now_ms()
}

fn now_ms() -> Option<i64> {
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Refuses the request with a 500 when keygate cannot do its job: failing closed.
fn send_internal_error(reason: &str) -> Action {
    let body = format!("{{\"error\":\"internal_error\",\"message\":\"{reason}\"}}");
    let headers = vec![("content-type", "application/json")];
    if let Err(status) = hostcalls::send_http_response(500, headers, Some(body.as_bytes())) {
        error!("keygate: cannot send the 500 reply: {status:?}");
    }
    Action::Pause
}
