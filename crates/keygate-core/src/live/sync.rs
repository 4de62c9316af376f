//! The key-set sync as a state machine that any host drives: on every tick ([`Syncer::on_tick`])
//! and on every answer of the key-set endpoint ([`Syncer::on_answer`]). It reaches the host only
//! through the small traits of [`crate::live::host`] (the [`Store`], an HTTP fetch, a monotonic clock,
//! and an [`Answer`] whose body is read only once its size is accepted) and tells the host what
//! happened through a [`Sink`] of [`Event`]s, which the host logs and counts.
//!
//! One sync: the manifest (with `If-None-Match` once the server gave an `ETag`), then every shard
//! whose etag changed, at most [`MAX_IN_FLIGHT`] at a time; applied all at once when the last one
//! arrives ([`apply_sync`]), or shard by shard on a first load, which has no last good set to keep.
//! Any failure abandons the sync: nothing more is applied, an answer that arrives later for it is
//! dropped unread, and the lease schedules the next try with backoff.

use crate::keys::KeySet;
use crate::live::apply::{apply_shard, apply_sync, retire, write_state, FetchedShard, Retired};
use crate::live::formats::{parse_manifest, parse_shard, prefixes, Manifest, ShardRef};
use crate::live::host::{Answer, Event, Gauges, Host, LoadedSet, Sink};
use crate::live::ids::{inline_ids, inline_place, prefix_of, shard_number, stored_position, IdIndex, INLINE, SEVERAL};
use crate::live::lease::{hold_lease, seconds_since, update_lease, Lease};
use crate::live::records::LiveSet;
use crate::live::settings::{Fetched, KeySetConfig};
use crate::live::store::{
    read_index, read_state, read_widths, stale_widths, width_bit, write_entry, ShardIndex, Store, SyncState,
};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Most shard fetches in flight at once during one sync.
pub const MAX_IN_FLIGHT: usize = 4;

/// This VM's part in keeping a live key set.
#[derive(Debug)]
pub struct Syncer {
    /// This VM's number, for the lease.
    me: u32,
    /// When this VM was configured, for the sync age before any sync.
    configured_ms: i64,
    run: Option<Run>,
    /// The digests of the inline keys' ids, once a sync needed them.
    inline_ids: Option<Arc<HashSet<u32>>>,
}

/// One sync in progress (this VM holds the lease).
#[derive(Debug)]
struct Run {
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
    queue: Vec<ShardRef>,
    in_flight: HashMap<u32, ShardRef>,
    fetched: Vec<FetchedShard>,
    /// No set has loaded yet, so there is no last good one to keep: each shard is written as it
    /// arrives (a VM's memory never shrinks, and a first load may be the whole set).
    first_load: bool,
    /// Shards fetched and checked in this sync.
    shards_fetched: usize,
    /// The records the shards kept as they are (not fetched) hold, by their indexes.
    unchanged_keys: u64,
}

fn write_to(store: &dyn Store) -> impl FnMut(&str, &[u8]) -> Result<(), String> + '_ {
    move |entry, value| write_entry(store, entry, value)
}

impl Syncer {
    /// The sync of VM number `me` ([`VmNumber`](crate::live::lease::VmNumber)), configured at
    /// monotonic time `configured_ms`.
    pub fn new(me: u32, configured_ms: i64) -> Self {
        Syncer { me, configured_ms, run: None, inline_ids: None }
    }

    pub fn me(&self) -> u32 {
        self.me
    }

    /// Whether a sync is in progress.
    pub fn syncing(&self) -> bool {
        self.run.is_some()
    }

    /// Every tick: follow the generation, refresh the gauges, take or renew the lease (also while a
    /// sync runs: a large first load outlasts the lease), abandon a sync gone silent, drop one whose
    /// lease another VM took meanwhile, and start one when this VM holds the lease and a poll is due.
    pub fn on_tick(&mut self, host: &Host<'_>, live: &LiveSet, sink: &mut dyn Sink) {
        let Some(now) = host.clock.monotonic_ms() else { return };
        let config = live.config();
        live.follow(host.store);
        sink.report(Event::Gauges(self.gauges(host.store, config, now)));
        let lease = hold_lease(host.store, config, self.me, now).unwrap_or_else(|reason| {
            sink.report(Event::LeaseTrouble(reason));
            None
        });
        if let Some(run) = &self.run {
            if let Some(holder) = lease.is_none().then(|| self.lease_moved(host.store, config)).flatten() {
                self.run = None;
                return sink.report(Event::Abandoned { holder });
            }
            if now.saturating_sub(run.last_answer_ms) > config.silence_limit_ms() {
                self.fail(host, live, "no answer from the key-set endpoint", sink);
            }
            return;
        }
        if lease.is_some_and(|l| l.due(now, config)) {
            self.start(host, live, now, sink);
        }
    }

    /// An answer of the endpoint, carrying `token` and announcing `body_size` bytes. An answer the
    /// sync in progress does not wait for (one of a sync abandoned) is dropped unread; a body past
    /// its limit fails the sync unread.
    #[allow(clippy::too_many_arguments)] // the answer, and what it is applied to; a struct would only rename them
    pub fn on_answer(
        &mut self,
        host: &Host<'_>,
        live: &LiveSet,
        inline: &KeySet,
        token: u32,
        body_size: usize,
        answer: &dyn Answer,
        sink: &mut dyn Sink,
    ) {
        let Some(run) = &self.run else { return };
        let what = if run.manifest_token == Some(token) {
            Fetched::Manifest
        } else if let Some(shard) = run.in_flight.get(&token) {
            Fetched::Shard(&shard.prefix)
        } else {
            return;
        };
        if let Some(holder) = self.lease_moved(host.store, live.config()) {
            // Another VM polls now and may have written a newer set: applying this one's plan
            // could only write an older set over it.
            self.run = None;
            return sink.report(Event::Abandoned { holder });
        }
        // The size first: a body past its limit is never copied into the VM, let alone parsed.
        let outcome = match live.config().refuse_body(what, body_size) {
            Some(reason) => Err(reason),
            None => self.take(host, live, inline, token, answer, sink),
        };
        if let Err(reason) = outcome {
            self.fail(host, live, &reason, sink);
        }
    }

    /// The VM that holds the lease now, when it is not this one (0, a lease just created, is no VM).
    fn lease_moved(&self, store: &dyn Store, config: &KeySetConfig) -> Option<u32> {
        let (value, _) = store.get(&config.lease_entry()).ok()??;
        Lease::decode(&value).map(|l| l.owner).filter(|owner| *owner != self.me && *owner != 0)
    }

    /// The gauges at monotonic time `now`.
    pub fn gauges(&self, store: &dyn Store, config: &KeySetConfig, now: i64) -> Gauges {
        let state = read_state(store, config);
        let since = state.as_ref().map_or(self.configured_ms, |s| s.synced_ms);
        Gauges {
            seconds_since_sync: seconds_since(since, now),
            loaded: state.map(|s| LoadedSet { version: s.version_number().unwrap_or(0), keys: s.keys }),
        }
    }

    fn start(&mut self, host: &Host<'_>, live: &LiveSet, now: i64, sink: &mut dyn Sink) {
        let config = live.config();
        let state = read_state(host.store, config);
        let first_load = state.is_none();
        let previous = state.unwrap_or_default();
        let mut headers =
            vec![(":method", "GET"), (":path", config.path.as_str()), (":authority", config.authority.as_str())];
        if let Some(etag) = &previous.manifest_etag {
            headers.push(("if-none-match", etag.as_str()));
        }
        let sent = host.fetch.get(&config.cluster, &headers, config.timeout_ms);
        drop(headers);
        match sent {
            Ok(token) => self.run = Some(Run::new(now, previous, token, first_load)),
            Err(reason) => self.fail(host, live, &reason, sink),
        }
    }

    /// Takes one awaited answer; `Err` abandons the sync.
    fn take(
        &mut self,
        host: &Host<'_>,
        live: &LiveSet,
        inline: &KeySet,
        token: u32,
        answer: &dyn Answer,
        sink: &mut dyn Sink,
    ) -> Result<(), String> {
        let config = live.config();
        let Some(run) = self.run.as_mut() else { return Ok(()) };
        run.last_answer_ms = host.clock.monotonic_ms().unwrap_or(run.last_answer_ms);
        if run.manifest_token == Some(token) {
            run.manifest_token = None;
            match answer.status() {
                304 if run.previous.manifest_etag.is_some() => return self.finish(host, live, sink),
                200 => {}
                0 => return Err("manifest: no answer (down, refused or timed out)".into()),
                other => return Err(format!("manifest: HTTP status {other}")),
            }
            let manifest = parse_manifest(&answer.body()).map_err(|e| e.to_string())?;
            let ids = Arc::clone(self.inline_ids.get_or_insert_with(|| Arc::new(inline_ids(inline))));
            run.plan(host.store, config, manifest, answer.etag(), ids)?;
        } else if let Some(shard) = run.in_flight.remove(&token) {
            run.take_shard(host.store, config, inline, shard, answer)?;
        } else {
            return Ok(());
        }
        while run.in_flight.len() < MAX_IN_FLIGHT {
            let Some(shard) = run.queue.pop() else { break };
            let path = config.shard_request_path(&shard.path);
            let headers = [(":method", "GET"), (":path", path.as_str()), (":authority", config.authority.as_str())];
            let token = host.fetch.get(&config.cluster, &headers, config.timeout_ms)?;
            run.in_flight.insert(token, shard);
        }
        if run.in_flight.is_empty() && run.queue.is_empty() {
            return self.finish(host, live, sink);
        }
        Ok(())
    }

    /// Applies the sync in progress to shared data, then schedules the next poll.
    fn finish(&mut self, host: &Host<'_>, live: &LiveSet, sink: &mut dyn Sink) -> Result<(), String> {
        let Some(mut run) = self.run.take() else { return Ok(()) };
        let (config, store) = (live.config(), host.store);
        let mut write = write_to(store);
        let now = host.clock.monotonic_ms().unwrap_or(run.started_ms);
        let records_changed = run.shards_fetched > 0 || run.retired.is_some();
        let changed = run.manifest.as_ref().is_some_and(|m| records_changed || m.version != run.previous.version);
        let (version, shards) = match &run.manifest {
            None => {
                let state = SyncState { synced_ms: now, ..run.previous.clone() };
                write(&config.state_entry(), &state.encode())?;
                (state.version, None)
            }
            Some(manifest) if run.first_load => {
                // The shards are written; the state, last, counts what their indexes hold.
                let indexes: Vec<ShardIndex> =
                    manifest.shards.iter().filter_map(|s| read_index(store, config, &s.prefix)).collect();
                let keys = indexes.iter().map(|i| i.hashes.len() as u64).sum();
                if let Some(retired) = &run.retired {
                    // What another layout left (a first load that failed part-way, say) and this
                    // set lacks stops working before the set counts as loaded.
                    let kept = indexes.iter().flat_map(|i| &i.hashes).collect();
                    retire(config, retired, &kept, manifest.width(), &mut write)?;
                }
                write_state(config, manifest, keys, run.manifest_etag.clone(), now, &mut write)?;
                write(&config.generation_entry(), now.to_string().as_bytes())?;
                (manifest.version.clone(), Some(run.shards_fetched))
            }
            Some(manifest) => {
                // What each shard's index lists now, not when the sync was planned: whatever wrote
                // it since, a record it lists and the new shard lacks is retired.
                for f in &mut run.fetched {
                    f.previous = read_index(store, config, &f.shard.prefix);
                }
                let (retired, etag) = (run.retired.as_ref(), run.manifest_etag.clone());
                apply_sync(config, manifest, &run.fetched, retired, run.unchanged_keys, etag, now, &mut write)?;
                if records_changed {
                    // Records changed: every VM empties its cache on its next tick.
                    write(&config.generation_entry(), now.to_string().as_bytes())?;
                    live.follow(store);
                }
                (manifest.version.clone(), Some(run.shards_fetched))
            }
        };
        live.mark_loaded();
        if let Err(reason) = update_lease(store, config, |l| l.after_success(now, config)) {
            sink.report(Event::ScheduleTrouble(reason));
        }
        sink.report(Event::Synced { version, shards, changed });
        sink.report(Event::Gauges(self.gauges(store, config, now)));
        Ok(())
    }

    /// Abandons the sync in progress: nothing it fetched is applied, and the next try backs off.
    fn fail(&mut self, host: &Host<'_>, live: &LiveSet, reason: &str, sink: &mut dyn Sink) {
        self.run = None;
        let config = live.config();
        let now = host.clock.monotonic_ms().unwrap_or_default();
        let next_try_ms = match update_lease(host.store, config, |l| l.after_failure(now, config)) {
            Ok(lease) => lease.next_due_ms.saturating_sub(now),
            Err(reason) => {
                sink.report(Event::ScheduleTrouble(reason));
                i64::try_from(config.poll_interval_ms).unwrap_or(i64::MAX)
            }
        };
        let keeping = read_state(host.store, config).map(|s| s.version);
        sink.report(Event::Failed { reason: reason.to_string(), keeping, next_try_ms });
    }
}

impl Run {
    fn new(now: i64, previous: SyncState, manifest_token: u32, first_load: bool) -> Self {
        Run {
            started_ms: now,
            last_answer_ms: now,
            previous,
            manifest_token: Some(manifest_token),
            manifest: None,
            manifest_etag: None,
            retired: None,
            ids: IdIndex::default(),
            queue: Vec::new(),
            in_flight: HashMap::new(),
            fetched: Vec::new(),
            first_load,
            shards_fetched: 0,
            unchanged_keys: 0,
        }
    }

    /// Plans the fetches of a new manifest: every shard whose etag changed, or every shard when
    /// another layout holds records too.
    fn plan(
        &mut self,
        store: &dyn Store,
        config: &KeySetConfig,
        manifest: Manifest,
        etag: Option<String>,
        inline_ids: Arc<HashSet<u32>>,
    ) -> Result<(), String> {
        let width = manifest.width();
        let mask = read_widths(store, config);
        if mask & width_bit(width) == 0 {
            // Before any index of this width is written, so that none is ever left unlisted.
            write_entry(store, &config.widths_entry(), (mask | width_bit(width)).to_string().as_bytes())?;
        }
        self.ids = IdIndex::new(inline_ids);
        let stale = stale_widths(mask, self.previous.width, width);
        if !stale.is_empty() {
            // Another layout holds records (the loaded one, or one a failed first load left):
            // every shard is fetched, and every key of the others is reconsidered.
            let mut retired = Retired::default();
            for prefix in stale.into_iter().flat_map(prefixes) {
                retired.hashes.extend(read_index(store, config, &prefix).map(|i| i.hashes).unwrap_or_default());
                retired.prefixes.push(prefix);
            }
            // Each shard is written against the index its own width holds then: what that index
            // lists and the new shard lacks is retired too (a failed sync at another width must
            // not spare it).
            self.queue.extend(manifest.shards.iter().cloned());
            self.retired = Some(retired);
        } else {
            for shard in &manifest.shards {
                match read_index(store, config, &shard.prefix) {
                    Some(i) if i.etag == shard.etag => {
                        self.unchanged_keys += i.hashes.len() as u64;
                        self.ids.add(shard_number(&shard.prefix), i.ids);
                    }
                    _ => self.queue.push(shard.clone()),
                }
            }
        }
        self.manifest = Some(manifest);
        self.manifest_etag = etag;
        Ok(())
    }

    /// Checks one fetched shard; on a first load, writes it at once.
    fn take_shard(
        &mut self,
        store: &dyn Store,
        config: &KeySetConfig,
        inline: &KeySet,
        shard: ShardRef,
        answer: &dyn Answer,
    ) -> Result<(), String> {
        let status = answer.status();
        if status != 200 {
            let what = if status == 0 { "no answer".to_string() } else { format!("HTTP status {status}") };
            return Err(format!("shard {:?} ({}): {what}", shard.prefix, shard.path));
        }
        let keys = parse_shard(&shard, &answer.body()).map_err(|e| e.to_string())?;
        let width = shard.prefix.len();
        let fetched_so_far = &self.fetched;
        let in_shard = |prefix: String, digest: u32, id: &str| {
            let position = match fetched_so_far.iter().find(|f| f.shard.prefix == prefix) {
                Some(f) => f.position_of(digest, id),
                None => stored_position(config, store, &prefix, digest, id),
            };
            position.map(|i| format!("shard {prefix:?} keys[{i}].id"))
        };
        let place_of = |place: u32, digest: u32, id: &str| match place {
            INLINE => inline_place(inline, id),
            SEVERAL => prefixes(width).find_map(|prefix| in_shard(prefix, digest, id)),
            n => in_shard(prefix_of(n, width), digest, id),
        };
        self.ids.check(&shard, &keys, place_of).map_err(|e| e.to_string())?;
        let mut fetched = FetchedShard::new(shard, keys, None, inline).map_err(|e| e.to_string())?;
        self.ids.add(shard_number(&fetched.shard.prefix), fetched.ids.iter().copied());
        self.shards_fetched += 1;
        if self.first_load {
            fetched.previous = read_index(store, config, &fetched.shard.prefix);
            apply_shard(config, &fetched, &mut write_to(store))?;
        } else {
            self.fetched.push(fetched);
        }
        Ok(())
    }
}
