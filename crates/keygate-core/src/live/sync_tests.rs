//! The key-set sync against the fake host ([`super::fake`]): what `tests/key_set.rs` proves in
//! Envoy, in simulated time: the lease and one poller, the backoff, the first load, layout changes,
//! the last good set, clock steps, VM numbers, conditional fetches, id checks, body limits, and the
//! regressions an outside attack found.
//!
//! Settings unless a test says otherwise: a 500 ms poll, a 300 ms timeout, so a 100 ms tick, a 3 s
//! lease, and a backoff of 1, 2, 4, then 5 s.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::*;
use crate::live::host::{Event, Gauges, LoadedSet};
use crate::live::lease::Lease;
use serde_json::{json, Value};

/// How long a recovery may take once the endpoint behaves: the backoff cap, the timeout, a tick.
const RECOVERY_MS: i64 = 5_000 + 300 + 200;

fn records(ids: &[&str]) -> Vec<Value> {
    ids.iter().map(|id| record(id)).collect()
}

fn prefix_of_id(id: &str, width: usize) -> String {
    hash_hex(&key(id))[..width].to_string()
}

/// One VM's Envoy with `records` loaded at `width` (version 1).
fn loaded(vms: usize, records: &[Value], width: usize) -> Envoy {
    let mut e = Envoy::new(vms, json!({}), &[]);
    e.publish(&Publication::new(records, width, 1));
    e.run_until_loaded(1, 2_000);
    e
}

fn poll_times(e: &Envoy, from: usize) -> Vec<(usize, i64)> {
    e.requests_for(MANIFEST)[from..].iter().map(|r| (r.vm, r.at)).collect()
}

fn gaps(times: &[(usize, i64)]) -> Vec<i64> {
    times.windows(2).map(|w| w[1].1 - w[0].1).collect()
}

// ---------------------------------------------------------------------------------------------
// Loading, and one poller per process

#[test]
fn a_published_set_loads_and_serves_every_vm() {
    let mut e = Envoy::new(2, json!({}), &[]);
    e.publish(&Publication::new(&records(&["a", "b"]), 1, 1));
    assert_eq!(e.seen_by_all(&key("a")), "unavailable", "before the first load");
    let took = e.run_until_loaded(1, 2_000);
    assert!(took <= 300, "the first load took {took} ms: a tick to create the lease, one to claim it");
    assert_eq!(e.seen_by_all(&key("a")), "a");
    assert_eq!(e.seen_by_all(&key("b")), "b");
    assert_eq!(e.seen_by_all(&key("nobody")), "unknown");
    let poller = e.requests_for(MANIFEST)[0].vm;
    assert_eq!(e.log(), [format!("vm {poller}: key set version 1 loaded, 16 shards fetched")]);
    assert_eq!(e.gauges(0), Some(Gauges { seconds_since_sync: 0, loaded: Some(LoadedSet { version: 1, keys: 2 }) }));
    for prefix in crate::live::formats::prefixes(1) {
        assert_eq!(e.requests_for(&Publication::served_path(&prefix)).len(), 1, "shard {prefix:?}");
    }
}

#[test]
fn exactly_one_of_four_vms_polls_once_per_interval() {
    let mut e = loaded(4, &records(&["live"]), 1);
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(5_000);
    let polls = poll_times(&e, seen);
    assert_eq!(polls.len(), 10, "{polls:?}");
    assert!(polls.iter().all(|(vm, _)| *vm == polls[0].0), "more than one VM polled: {polls:?}");
    assert!(gaps(&polls).iter().all(|g| *g == 500), "{polls:?}");
    assert_eq!(e.syncs(), 11, "every unchanged poll is a good sync");
    assert_eq!(e.seen_by_all(&key("live")), "live");
}

#[test]
fn a_vm_that_read_its_clock_just_before_the_holder_renewed_does_not_take_the_lease() {
    // On Envoy every worker reads the clock, then the lease; a worker preempted between the two
    // finds the lease renewed a moment after its own reading, lasting a little longer than a lease
    // can from its `now`. Taken for a lease set against another clock, it was claimed, and two
    // workers polled at once (seen in CI: two manifest fetches 346 µs apart).
    let mut e = loaded(4, &records(&["live"]), 1);
    let poller = e.requests_for(MANIFEST).last().unwrap().vm;
    // The workers' timers fire at different phases: a reading one tick old precedes the holder's
    // latest renewal, whichever VM's timer fired last.
    let lag = e.world.config.tick_ms() as i64;
    for (i, vm) in e.vms.iter_mut().enumerate() {
        vm.clock_lag_ms = if i == poller { 0 } else { lag };
    }
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(5_000);
    let polls = poll_times(&e, seen);
    assert!(polls.iter().all(|(vm, _)| *vm == poller), "another VM took the lease: {polls:?}");
    assert!((9..=11).contains(&polls.len()), "{polls:?}");
    assert!(gaps(&polls).iter().all(|g| *g == 500), "{polls:?}");
}

#[test]
fn eight_vms_starting_together_load_every_shard_once_and_poll_as_one() {
    let ids: Vec<String> = (0..32).map(|i| format!("n{i:02}")).collect();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut e = loaded(8, &records(&all), 1);
    let numbers: std::collections::HashSet<u32> = e.vms.iter().map(|vm| vm.sync.me()).collect();
    assert_eq!(numbers.len(), 8, "two VMs share a number");
    assert!(!numbers.contains(&0), "0 means no holder in the lease");
    for prefix in crate::live::formats::prefixes(1) {
        assert_eq!(e.requests_for(&Publication::served_path(&prefix)).len(), 1, "shard {prefix:?}");
    }
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(4_000);
    let polls = poll_times(&e, seen);
    assert_eq!(polls.len(), 8);
    assert!(polls.iter().all(|(vm, _)| *vm == polls[0].0), "{polls:?}");
    assert_eq!(e.seen_by_all(&key("n07")), "n07");
}

#[test]
fn a_stalled_poller_loses_the_lease_to_another_vm_which_keeps_the_pace() {
    let mut e = loaded(3, &records(&["live"]), 1);
    e.run_ms(1_000);
    let poller = e.requests_for(MANIFEST).last().unwrap().vm;
    e.vms[poller].stalled = true;
    let stalled_at = e.now();
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(6_000);
    let polls = poll_times(&e, seen);
    let (heir, first) = polls[0];
    assert_ne!(heir, poller);
    // The lease, last renewed at the stalled VM's last tick, lasts 3 s; the next tick takes it.
    assert!(
        (stalled_at + 2_900..=stalled_at + 3_110).contains(&first),
        "taken over at {first}, stalled at {stalled_at}"
    );
    assert!(polls.iter().all(|(vm, _)| *vm == heir), "{polls:?}");
    assert!(gaps(&polls).iter().all(|g| *g == 500), "{polls:?}");

    // The stalled VM wakes up: the lease is another's now, so it only reads.
    e.vms[poller].stalled = false;
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(3_000);
    let polls = poll_times(&e, seen);
    assert!(polls.iter().all(|(vm, _)| *vm == heir), "{polls:?}");
    assert_eq!(e.seen(poller, &key("live")), "live");
}

// ---------------------------------------------------------------------------------------------
// Backoff

#[test]
fn failed_syncs_back_off_doubling_to_the_cap() {
    let mut e = loaded(1, &records(&["live"]), 1);
    e.origin().faults.insert(MANIFEST.into(), Fault::Status(503));
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(20_000);
    let polls = poll_times(&e, seen);
    assert_eq!(gaps(&polls)[..5], [1_000, 2_000, 4_000, 5_000, 5_000], "{polls:?}");
    assert_eq!(
        e.log()[1..4],
        [
            "vm 0: key-set sync failed: manifest: HTTP status 503; keeping version 1; next try in 1000 ms",
            "vm 0: key-set sync failed: manifest: HTTP status 503; keeping version 1; next try in 2000 ms",
            "vm 0: key-set sync failed: manifest: HTTP status 503; keeping version 1; next try in 4000 ms",
        ]
    );
    // Once the endpoint behaves, the next try succeeds and the pace is the poll interval again.
    e.origin().faults.clear();
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(6_000);
    let polls = poll_times(&e, seen);
    assert!(gaps(&polls[1..]).iter().all(|g| *g == 500), "{polls:?}");
}

#[test]
fn the_backoff_survives_the_lease_moving_to_another_vm() {
    let mut e = loaded(2, &records(&["live"]), 1);
    e.origin().faults.insert(MANIFEST.into(), Fault::Status(503));
    e.run_until(10_000, |e| e.failures().len() == 2).unwrap();
    let poller = e.requests_for(MANIFEST).last().unwrap().vm;
    e.vms[poller].stalled = true;
    let seen = e.requests_for(MANIFEST).len();
    e.run_until(10_000, |e| e.requests_for(MANIFEST).len() == seen + 2).unwrap();
    let polls = poll_times(&e, seen);
    assert!(polls.iter().all(|(vm, _)| *vm != poller));
    // Two failures were counted before the move: the third waits 4 s, not the 1 s of a first.
    assert_eq!(gaps(&polls), [4_000]);
    let lease = Lease::decode(&e.world.store.value(&e.world.config.lease_entry()).unwrap()).unwrap();
    assert_eq!(lease.failures, 4);
}

#[test]
fn a_sync_that_outlived_its_lease_is_dropped_unapplied() {
    let mut e = loaded(2, &records(&["live"]), 1);
    // The poller's next poll gets no answer in time; it stalls with the call in flight.
    e.origin().faults.insert(MANIFEST.into(), Fault::Slow(1_000));
    e.run_until(2_000, |e| e.vms.iter().any(|vm| vm.sync.syncing())).unwrap();
    let stalled = e.vms.iter().position(|vm| vm.sync.syncing()).unwrap();
    e.vms[stalled].stalled = true;
    e.origin().faults.insert(MANIFEST.into(), Fault::Status(503));
    // The other VM takes the lease and fails once: that failure is in the lease.
    e.run_until(5_000, |e| e.failures().len() == 1).unwrap();
    let holder = e.vms[1 - stalled].sync.me();
    // The stalled VM wakes up to its answer: it drops its sync, unread, and counts nothing.
    e.vms[stalled].stalled = false;
    e.world.bodies_read.borrow_mut().clear();
    e.step();
    assert!(!e.vms[stalled].sync.syncing());
    assert!(e.world.bodies_read.borrow().is_empty());
    assert_eq!(e.failures().len(), 1);
    assert_eq!(
        e.vms[stalled].events.iter().rfind(|e| !matches!(e, Event::Gauges(_))).map(|e| e.to_string()),
        Some(format!("key-set sync dropped: the lease moved to VM {holder} while it ran"))
    );
    let lease = Lease::decode(&e.world.store.value(&e.world.config.lease_entry()).unwrap()).unwrap();
    assert_eq!((lease.owner, lease.failures), (holder, 1));

    // Stalled with no answer due, it drops its sync on its first tick instead.
    e.origin().faults.insert(MANIFEST.into(), Fault::Lost);
    e.run_until(RECOVERY_MS, |e| e.vms[1 - stalled].sync.syncing()).unwrap();
    e.vms[1 - stalled].stalled = true;
    e.run_until(5_000, |e| e.vms[stalled].sync.syncing()).unwrap();
    e.vms[1 - stalled].stalled = false;
    e.run_ms(110);
    assert!(!e.vms[1 - stalled].sync.syncing());
    assert_eq!(
        e.vms[1 - stalled].events.iter().rfind(|e| !matches!(e, Event::Gauges(_))).map(|e| e.to_string()),
        Some(format!("key-set sync dropped: the lease moved to VM {} while it ran", e.vms[stalled].sync.me()))
    );
}

// ---------------------------------------------------------------------------------------------
// The first load

#[test]
fn the_first_load_streams_shard_by_shard_and_is_unavailable_until_then() {
    let ids = ids_in_distinct_shards("fl", 3);
    let mut e = Envoy::new(2, json!({"timeout_ms": 2_000}), &[record("breakglass")]);
    e.publish(&Publication::new(&records(&[&ids[0], &ids[1], &ids[2]]), 1, 1));
    e.origin().faults.insert(Publication::served_path(&prefix_of_id(&ids[2], 1)), Fault::Slow(1_500));
    let first = ids[0].clone();
    e.run_until(1_000, |e| e.seen(0, &key(&first)) == first).unwrap();
    // The other shards are written, the slow one is not, and nothing counts as loaded yet.
    assert_eq!(e.world.store.value(&e.world.config.state_entry()), None);
    assert_eq!(e.seen_by_all(&key(&ids[1])), ids[1]);
    assert_eq!(e.seen_by_all(&key(&ids[2])), "unavailable");
    assert_eq!(e.seen_by_all(&key("nobody")), "unavailable");
    assert_eq!(e.seen_by_all(&key("breakglass")), "breakglass", "inline keys work before any load");
    assert_eq!(e.gauges(0).unwrap().loaded, None);
    e.run_until_loaded(1, 2_000);
    assert_eq!(e.seen_by_all(&key(&ids[2])), ids[2]);
    assert_eq!(e.seen_by_all(&key("nobody")), "unknown");
}

#[test]
fn a_first_load_that_fails_part_way_keeps_what_arrived_and_loads_nothing() {
    let ids = ids_in_distinct_shards("fp", 2);
    let mut e = Envoy::new(1, json!({}), &[]);
    e.publish(&Publication::new(&records(&[&ids[0], &ids[1]]), 1, 1));
    // Shard "0" is the last the fake's sync asks for: every other one has arrived when it fails.
    let blocked = prefix_of_id(&ids[0], 1);
    e.origin().faults.insert(Publication::served_path(&blocked), Fault::Status(503));
    e.run_until(2_000, |e| !e.failures().is_empty()).unwrap();
    assert_eq!(e.seen(0, &key(&ids[1])), ids[1]);
    assert_eq!(e.seen(0, &key(&ids[0])), "unavailable");
    assert_eq!(
        e.log(),
        [format!(
            "vm 0: key-set sync failed: shard \"{blocked}\" (shards/{blocked}.json): HTTP status 503; keeping none loaded yet; next try in 1000 ms"
        )]
    );
    e.origin().faults.clear();
    e.run_until_loaded(1, RECOVERY_MS);
    assert_eq!(e.seen(0, &key(&ids[0])), ids[0]);
}

#[test]
fn a_cold_start_with_the_endpoint_down_is_unavailable_then_recovers() {
    let mut e = Envoy::new(2, json!({}), &[]);
    e.publish(&Publication::new(&records(&["live"]), 1, 5));
    e.origin().every_path = Some(Fault::Down);
    e.run_until(5_000, |e| e.failures().len() >= 2).unwrap();
    assert_eq!(e.seen_by_all(&key("live")), "unavailable");
    assert_eq!(e.failures()[0], "manifest: no answer (down, refused or timed out)");
    e.origin().every_path = None;
    e.run_until_loaded(5, RECOVERY_MS);
    assert_eq!(e.seen_by_all(&key("live")), "live");
    assert_eq!(e.seen_by_all(&key("unknown")), "unknown");
}

// ---------------------------------------------------------------------------------------------
// Changes

#[test]
fn revoked_removed_and_new_keys_show_on_every_vm_within_a_poll_and_a_tick() {
    let mut e = loaded(3, &records(&["gone", "revoke", "stays"]), 1);
    // Every VM decodes (and keeps) the records.
    for id in ["gone", "revoke", "stays"] {
        assert_eq!(e.seen_by_all(&key(id)), id);
    }
    assert_eq!(e.seen_by_all(&key("new")), "unknown");
    e.publish(&Publication::new(&[revoked("revoke"), record("stays"), record("new")], 1, 2));
    let took = e.run_until(2_000, |e| {
        e.all_see(&key("gone"), "unknown")
            && e.all_see(&key("revoke"), "revoked revoke")
            && e.all_see(&key("new"), "new")
    });
    assert!(took.is_some_and(|t| t <= 600), "took {took:?}: a poll interval and a tick at most");
    assert_eq!(e.seen_by_all(&key("stays")), "stays");
    assert_eq!(e.gauges(0).unwrap().loaded, Some(LoadedSet { version: 2, keys: 3 }));
}

#[test]
fn an_unchanged_manifest_is_answered_304_and_no_shard_is_refetched() {
    let ids: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut e = loaded(1, &records(&all), 1);
    let etag = format!("\"{}\"", hash_hex(std::str::from_utf8(&e.origin().files[MANIFEST]).unwrap()));
    e.run_ms(2_000);
    let later = &e.requests_for(MANIFEST)[1..];
    assert_eq!(later.len(), 4);
    for r in later {
        assert_eq!((r.if_none_match.as_deref(), r.status), (Some(etag.as_str()), 304), "{r:?}");
    }
    for prefix in crate::live::formats::prefixes(1) {
        assert_eq!(e.requests_for(&Publication::served_path(&prefix)).len(), 1, "{prefix:?} fetched again");
    }
    assert_eq!(e.syncs(), 5, "a 304 is a good sync");
    assert!(e.vms[0].events.contains(&Event::Synced { version: "1".into(), shards: None, changed: false }));
    assert_eq!(e.gauges(0).unwrap().seconds_since_sync, 0, "a 304 counts as a sync");
    assert_eq!(e.seen(0, &key("k07")), "k07");
}

#[test]
fn a_server_without_etags_gets_no_if_none_match_and_still_syncs() {
    let mut e = Envoy::new(1, json!({}), &[]);
    e.origin().no_etags = true;
    e.publish(&Publication::new(&records(&["one"]), 1, 1));
    e.run_until_loaded(1, 2_000);
    e.run_ms(1_000);
    for r in e.requests_for(MANIFEST) {
        assert_eq!((r.if_none_match, r.status), (None, 200));
    }
    e.publish(&Publication::new(&records(&["one", "two"]), 1, 2));
    assert!(e.run_until(600, |e| e.seen(0, &key("two")) == "two").is_some());
}

#[test]
fn one_revocation_refetches_only_its_shard() {
    let ids: Vec<String> = (0..40).map(|i| format!("k{i:02}")).collect();
    let mut set: Vec<Value> = ids.iter().map(|id| record(id)).collect();
    let mut e = loaded(1, &set, 1);
    set[7] = revoked("k07");
    e.publish(&Publication::new(&set, 1, 2));
    e.run_until_synced("2", 1_000);
    let target = Publication::served_path(&prefix_of_id("k07", 1));
    for prefix in crate::live::formats::prefixes(1) {
        let path = Publication::served_path(&prefix);
        assert_eq!(e.requests_for(&path).len(), if path == target { 2 } else { 1 }, "{path}");
    }
    assert_eq!(e.log()[1], "vm 0: key set version 2 loaded, 1 shards fetched");
    assert_eq!(e.seen(0, &key("k07")), "revoked k07");
    assert_eq!(e.gauges(0).unwrap().loaded.unwrap().keys, 40);
}

#[test]
fn a_layout_change_retires_the_keys_the_new_layout_leaves_out() {
    let ids: Vec<String> = (0..8).map(|i| format!("r{i}")).collect();
    let set: Vec<Value> = ids.iter().map(|id| record(id)).collect();
    let mut e = loaded(2, &set, 1);
    e.publish(&Publication::new(&set[..4], 0, 2));
    e.run_until_synced("2", 1_000);
    e.run_ms(200);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(e.seen_by_all(&key(id)), if i < 4 { id.as_str() } else { "unknown" });
    }
    assert_eq!(e.gauges(0).unwrap().loaded.unwrap().keys, 4);
    let mut back = set[..4].to_vec();
    back.push(record("r7"));
    e.publish(&Publication::new(&back, 1, 3));
    e.run_until_synced("3", 1_000);
    e.run_ms(200);
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(e.seen_by_all(&key(id)), if i < 4 || i == 7 { id.as_str() } else { "unknown" });
    }
    assert_eq!(e.gauges(0).unwrap().loaded.unwrap().keys, 5);
    // Every index of the one-shard layout is voided, and `widths` lists width 1 alone.
    assert_eq!(e.world.store.value(&e.world.config.widths_entry()).as_deref(), Some(&b"2"[..]));
}

// ---------------------------------------------------------------------------------------------
// The last good set

/// The keys of a last-known-good scenario: `a` is revoked and `c` added by the change, `b` stays;
/// each in a 1-digit shard of its own.
struct Change {
    a: String,
    b: String,
    c: String,
    /// The change, laid out: version 2.
    publication: Publication,
}

impl Change {
    fn new() -> Change {
        let ids = ids_in_distinct_shards("lkg", 3);
        let (a, b, c) = (ids[0].clone(), ids[1].clone(), ids[2].clone());
        let publication = Publication::new(&[revoked(&a), record(&b), record(&c)], 1, 2);
        Change { a, b, c, publication }
    }

    fn c_path(&self) -> String {
        Publication::served_path(&prefix_of_id(&self.c, 1))
    }
}

/// Loads {a, b} (version 1) on two VMs; lets `inject` publish the change through a faulty channel;
/// checks that over two failed syncs, the first failing for `why`, a still works, c is unknown and
/// the version stays 1; lets `heal` fix the channel; checks the change then shows.
fn last_good_set_survives(inline: &[Value], inject: impl FnOnce(&mut Envoy, &Change), why: &str) {
    let change = Change::new();
    let mut e = Envoy::new(2, json!({}), inline);
    e.publish(&Publication::new(&[record(&change.a), record(&change.b)], 1, 1));
    e.run_until_loaded(1, 2_000);
    let syncs = e.syncs();
    inject(&mut e, &change);
    for _ in 0..2_000 {
        if e.failures().len() >= 2 {
            break;
        }
        e.step();
        assert_eq!(e.seen_by_all(&key(&change.a)), change.a, "during the fault");
        assert_eq!(e.seen_by_all(&key(&change.c)), "unknown", "during the fault");
    }
    let failures = e.failures();
    assert!(failures.len() >= 2, "fewer than two failed syncs: {:#?}", e.log());
    assert!(failures[0].contains(why), "failed for {:?}, not {why:?}", failures[0]);
    assert_eq!(e.syncs(), syncs, "a sync counted as good while the endpoint misbehaved");
    assert_eq!(e.gauges(0).unwrap().loaded, Some(LoadedSet { version: 1, keys: 2 }));
    assert!(e.log().iter().all(|line| !line.contains("sk_live_")), "a key in a log line: {:#?}", e.log());

    e.origin().faults.clear();
    e.origin().every_path = None;
    e.publish(&change.publication);
    e.run_until_synced("2", RECOVERY_MS);
    e.run_ms(200);
    assert_eq!(e.seen_by_all(&key(&change.a)), format!("revoked {}", change.a));
    assert_eq!(e.seen_by_all(&key(&change.b)), change.b);
    assert_eq!(e.seen_by_all(&key(&change.c)), change.c);
    assert_eq!(e.gauges(0).unwrap().loaded, Some(LoadedSet { version: 2, keys: 3 }));
}

fn manifest_fault(fault: Fault) -> impl FnOnce(&mut Envoy, &Change) {
    move |e, change| {
        e.publish(&change.publication);
        e.origin().faults.insert(MANIFEST.into(), fault);
    }
}

/// A fault on the shard that gains key c (the one revoking a is served well).
fn c_shard_fault(fault: Fault) -> impl FnOnce(&mut Envoy, &Change) {
    move |e, change| {
        e.publish(&change.publication);
        e.origin().faults.insert(change.c_path(), fault);
    }
}

/// The change with the shard of key c replaced by `body` (its etag in the manifest recomputed when
/// `reseal`, so only the content is wrong).
fn c_shard_content(body: impl FnOnce(&Change) -> Vec<u8>, reseal: bool) -> impl FnOnce(&mut Envoy, &Change) {
    move |e, change| {
        let mut bad = change.publication.clone();
        bad.set_body(&prefix_of_id(&change.c, 1), body(change), reseal);
        e.publish(&bad);
    }
}

fn shard_body(records: &[Value]) -> Vec<u8> {
    json!({ "keys": records }).to_string().into_bytes()
}

const HTML: &[u8] = b"<!DOCTYPE html>\n<html><body><h1>We'll be back soon</h1></body></html>\n";

#[test]
fn a_misbehaving_manifest_keeps_the_last_good_set() {
    last_good_set_survives(&[], manifest_fault(Fault::Status(503)), "manifest: HTTP status 503");
    last_good_set_survives(&[], manifest_fault(Fault::Down), "manifest: no answer (down, refused or timed out)");
    last_good_set_survives(&[], manifest_fault(Fault::Slow(1_200)), "manifest: no answer");
    last_good_set_survives(&[], manifest_fault(Fault::Body(HTML.to_vec())), "manifest: ");
    last_good_set_survives(
        &[],
        |e, change| {
            e.publish(&change.publication);
            e.origin().files.remove(MANIFEST);
        },
        "manifest: HTTP status 404",
    );
    last_good_set_survives(
        &[],
        |e, change| {
            e.publish(&change.publication);
            let manifest = change.publication.manifest();
            e.origin().faults.insert(MANIFEST.into(), Fault::Body(manifest[..manifest.len() / 2].to_vec()));
        },
        "manifest: ",
    );
    last_good_set_survives(
        &[],
        |e, change| {
            // Valid JSON, wrong shape: shards as a map of prefix to path.
            e.publish(&change.publication);
            let body = json!({"version": "2", "shards": {"0": "shards/0.json"}}).to_string().into_bytes();
            e.origin().faults.insert(MANIFEST.into(), Fault::Body(body));
        },
        "manifest: shards",
    );
    last_good_set_survives(
        &[],
        |e, change| {
            // 15 of the 16 shards: prefix "f" is covered by nothing.
            e.publish(&change.publication);
            let mut manifest: Value = serde_json::from_slice(&change.publication.manifest()).unwrap();
            manifest["shards"].as_array_mut().unwrap().pop();
            e.origin().faults.insert(MANIFEST.into(), Fault::Body(manifest.to_string().into_bytes()));
        },
        "manifest.shards: 15 shards with 1-digit prefixes must be exactly 16",
    );
}

#[test]
fn a_misbehaving_shard_keeps_the_last_good_set() {
    let p = prefix_of_id(&ids_in_distinct_shards("lkg", 3)[2], 1);
    let at = format!("shard \"{p}\" (shards/{p}.json)");
    last_good_set_survives(&[], c_shard_fault(Fault::Status(500)), &format!("{at}: HTTP status 500"));
    last_good_set_survives(&[], c_shard_fault(Fault::Down), &format!("{at}: no answer"));
    last_good_set_survives(&[], c_shard_fault(Fault::Slow(1_200)), &format!("{at}: no answer"));
    let mismatch = format!("{at}: content does not match its etag (SHA-256)");
    last_good_set_survives(&[], c_shard_fault(Fault::Body(HTML.to_vec())), &mismatch);
    last_good_set_survives(&[], c_shard_content(|ch| shard_body(&[record(&ch.c)])[..20].to_vec(), false), &mismatch);
    // The manifest names the right content; the server sends other (valid) content.
    let intruder = |ch: &Change| shard_body(&[record(&ch.c), record("intruder")]);
    last_good_set_survives(&[], c_shard_content(intruder, false), &mismatch);
    let shape = |_: &Change| br#"{"keys": {"hash": "not a list"}}"#.to_vec();
    last_good_set_survives(&[], c_shard_content(shape, true), &format!("{at}: keys"));
    let no_org = |ch: &Change| {
        let mut broken = record(&ch.c);
        broken.as_object_mut().unwrap().remove("org");
        shard_body(&[broken])
    };
    last_good_set_survives(&[], c_shard_content(no_org, true), &format!("{at}: keys[0]"));
    let twin = |ch: &Change| {
        let mut twin = record(&ch.c);
        twin["id"] = json!("twin");
        shard_body(&[record(&ch.c), twin])
    };
    last_good_set_survives(&[], c_shard_content(twin, true), &format!("{at}: keys[1].hash: duplicate hash"));
}

#[test]
fn a_key_in_the_wrong_shard_keeps_the_last_good_set() {
    let b = ids_in_distinct_shards("lkg", 3)[1].clone();
    let pb = prefix_of_id(&b, 1);
    last_good_set_survives(
        &[],
        |e, change| {
            // Key c listed in key b's shard (etag consistent), its own shard left empty.
            let mut bad = change.publication.clone();
            bad.set_body(&prefix_of_id(&change.c, 1), shard_body(&[]), true);
            bad.set_body(&pb, shard_body(&[record(&change.b), record(&change.c)]), true);
            e.publish(&bad);
        },
        &format!("shard \"{pb}\" (shards/{pb}.json): keys[1].hash: does not start with the shard's prefix \"{pb}\""),
    );
}

#[test]
fn an_id_in_two_shards_keeps_the_last_good_set_and_names_both() {
    let ids = ids_in_distinct_shards("lkg", 3);
    let (pb, pc) = (prefix_of_id(&ids[1], 1), prefix_of_id(&ids[2], 1));
    let why =
        format!("shard \"{pc}\" (shards/{pc}.json): keys[0].id: \"{}\" is also shard \"{pb}\" keys[0].id", ids[1]);
    // Key c published under key b's id: the upstream would be told "b" for two keys.
    let renamed = |ch: &Change| {
        let mut c = record(&ch.c);
        c["id"] = json!(ch.b);
        shard_body(&[c])
    };
    last_good_set_survives(&[], c_shard_content(renamed, true), &why);
}

#[test]
fn an_id_or_hash_also_inline_keeps_the_last_good_set() {
    let pc = prefix_of_id(&ids_in_distinct_shards("lkg", 3)[2], 1);
    let why = format!(
        "shard \"{pc}\" (shards/{pc}.json): keys[0].id: \"inline\" is also the id of an inline key (the configuration's `keys`)"
    );
    let renamed = |ch: &Change| {
        let mut c = record(&ch.c);
        c["id"] = json!("inline");
        shard_body(&[c])
    };
    last_good_set_survives(&[record("inline")], c_shard_content(renamed, true), &why);

    let pi = prefix_of_id("inline", 1);
    last_good_set_survives(
        &[record("inline")],
        |e, change| {
            // The change also lists the inline key: the README says the sync is refused.
            let mut bad = change.publication.clone();
            let (_, body, _) = bad.shards.iter().find(|(p, _, _)| *p == pi).unwrap();
            let mut keys: Value = serde_json::from_slice(body).unwrap();
            let mut twin = record("inline");
            twin["id"] = json!("not_inline");
            keys["keys"].as_array_mut().unwrap().push(twin);
            bad.set_body(&pi, keys.to_string().into_bytes(), true);
            e.publish(&bad);
        },
        &format!("shard \"{pi}\": key \"not_inline\": its hash is also an inline key in `keys`"),
    );
}

#[test]
fn a_sync_is_all_or_nothing() {
    // The change's shard revoking a arrives and checks out; c's fails: a must keep working.
    let change = Change::new();
    let mut e = Envoy::new(1, json!({}), &[]);
    e.publish(&Publication::new(&[record(&change.a), record(&change.b)], 1, 1));
    e.run_until_loaded(1, 2_000);
    e.publish(&change.publication);
    e.origin().faults.insert(change.c_path(), Fault::Status(500));
    e.run_until(2_000, |e| !e.failures().is_empty()).unwrap();
    let pa = Publication::served_path(&prefix_of_id(&change.a, 1));
    assert_eq!(e.requests_for(&pa).len(), 2, "a's shard was fetched (and checked) by the failed sync");
    assert_eq!(e.seen(0, &key(&change.a)), change.a);
    let pa = prefix_of_id(&change.a, 1);
    let index = crate::live::store::read_index(&e.world.store, &e.world.config, &pa).unwrap();
    let v1 = Publication::new(&[record(&change.a), record(&change.b)], 1, 1);
    assert_eq!(Some(index.etag), v1.shards.iter().find(|(p, _, _)| *p == pa).map(|s| s.2), "a's shard unchanged");
}

// ---------------------------------------------------------------------------------------------
// Body limits, silence, a host that cannot send

#[test]
fn bodies_past_their_limits_are_refused_unread() {
    let mut e = Envoy::new(1, json!({"max_manifest_bytes": 4096, "max_shard_bytes": 2048}), &[]);
    let ids = ids_in_distinct_shards("big", 2);
    e.publish(&Publication::new(&records(&[&ids[0]]), 1, 1));
    e.run_until_loaded(1, 2_000);

    e.world.bodies_read.borrow_mut().clear();
    e.origin().faults.insert(MANIFEST.into(), Fault::Huge(4097));
    e.run_until(2_000, |e| e.failures().len() == 1).unwrap();
    assert_eq!(e.failures()[0], "manifest: the body is 4097 bytes, more than key_set.max_manifest_bytes (4096)");
    assert!(e.world.bodies_read.borrow().is_empty(), "a body past its limit was read");
    // At the limit, the body is read (and, 16 spaces announced as 4 096 bytes, refused as JSON).
    e.origin().faults.insert(MANIFEST.into(), Fault::Huge(4096));
    e.run_until(2_000, |e| e.failures().len() == 2).unwrap();
    assert_eq!(*e.world.bodies_read.borrow(), [MANIFEST]);

    let p = prefix_of_id(&ids[1], 1);
    e.origin().faults.clear();
    e.publish(&Publication::new(&records(&[&ids[0], &ids[1]]), 1, 2));
    e.origin().faults.insert(Publication::served_path(&p), Fault::Huge(2049));
    e.world.bodies_read.borrow_mut().clear();
    e.run_until(RECOVERY_MS, |e| e.failures().len() == 3).unwrap();
    assert_eq!(
        e.failures()[2],
        format!("shard \"{p}\": the body is 2049 bytes, more than key_set.max_shard_bytes (2048)")
    );
    assert_eq!(*e.world.bodies_read.borrow(), [MANIFEST], "only the manifest was read");
    assert_eq!(e.seen(0, &key(&ids[1])), "unknown");
}

#[test]
fn a_sync_with_no_answer_at_all_is_abandoned_after_the_silence_limit() {
    let mut e = loaded(1, &records(&["live"]), 1);
    e.origin().faults.insert(MANIFEST.into(), Fault::Lost);
    e.run_until(1_000, |e| e.vms[0].sync.syncing()).unwrap();
    let took = e.run_until(10_000, |e| !e.failures().is_empty()).unwrap();
    let limit = e.world.config.silence_limit_ms();
    assert!((limit..=limit + 110).contains(&took), "abandoned after {took} ms, the limit is {limit}");
    assert_eq!(e.failures(), ["no answer from the key-set endpoint"]);
    assert_eq!(e.seen(0, &key("live")), "live");
}

#[test]
fn a_host_that_cannot_send_fails_the_sync_and_backs_off() {
    let mut e = loaded(1, &records(&["live"]), 1);
    e.origin().refuse_calls = true;
    e.run_until(3_000, |e| e.failures().len() == 2).unwrap();
    assert_eq!(
        e.log()[1],
        "vm 0: key-set sync failed: cannot call cluster \"keyset\": BadArgument; keeping version 1; next try in 1000 ms"
    );
    assert!(!e.vms[0].sync.syncing());
}

// ---------------------------------------------------------------------------------------------
// Stats

#[test]
fn the_gauges_show_version_keys_and_a_sync_age_on_the_monotonic_clock() {
    let ids: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    let set: Vec<Value> = ids.iter().map(|id| record(id)).collect();
    let mut e = Envoy::new(1, json!({}), &[record("inline")]);
    // Before any sync: the age counts from the configuration.
    e.origin().every_path = Some(Fault::Status(503));
    e.run_ms(2_100);
    assert_eq!(e.gauges(0), Some(Gauges { seconds_since_sync: 2, loaded: None }));
    e.origin().every_path = None;
    e.publish(&Publication::new(&set, 1, 1732355000));
    e.run_until_loaded(1732355000, RECOVERY_MS);
    assert_eq!(e.gauges(0).unwrap().loaded, Some(LoadedSet { version: 1732355000, keys: 5 }));
    e.publish(&Publication::new(&set[..3], 1, "2026-11-23.b"));
    e.run_until_synced("2026-11-23.b", 1_000);
    assert_eq!(e.gauges(0), Some(Gauges { seconds_since_sync: 0, loaded: Some(LoadedSet { version: 0, keys: 3 }) }));
    // The age grows while the endpoint fails, and each failure counts.
    e.origin().every_path = Some(Fault::Status(503));
    let failures = e.failures().len();
    e.run_ms(3_500);
    assert_eq!(e.gauges(0).unwrap().seconds_since_sync, 3);
    assert!(e.failures().len() >= failures + 2);
}

// ---------------------------------------------------------------------------------------------
// Clock steps

#[test]
fn a_monotonic_clock_jumping_forward_keeps_one_poller_at_the_same_pace() {
    let mut e = loaded(2, &records(&["a"]), 1);
    e.jump(3_600_000);
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(3_000);
    let polls = poll_times(&e, seen);
    assert!(polls[0].1 - e.now() + 3_000 <= 110, "the first poll after the jump waited: {polls:?}");
    assert!(polls[1..].iter().all(|(vm, _)| *vm == polls[1].0), "{polls:?}");
    assert!(gaps(&polls).iter().all(|g| *g == 500), "{polls:?}");
    assert_eq!(e.gauges(0).unwrap().seconds_since_sync, 0);
}

#[test]
fn a_schedule_lease_and_sync_time_an_hour_ahead_are_not_waited_out() {
    // What a VM finds after the clock its shared data was written against stepped back an hour: a
    // lease held by another VM, a poll due and a last sync, all an hour ahead.
    for planted in [true, false] {
        let mut e = loaded(2, &records(&["a", "b"]), 1);
        let hour = 3_600_000;
        if planted {
            let (c, ahead) = (e.world.config.clone(), e.now() + hour);
            let lease = Lease { owner: u32::MAX - 1, expires_ms: ahead, next_due_ms: ahead, failures: 0 };
            let state = crate::live::store::SyncState {
                version: "1".into(),
                keys: 2,
                synced_ms: ahead,
                manifest_etag: None,
                width: Some(1),
            };
            crate::live::store::write_entry(&e.world.store, &c.lease_entry(), &lease.encode()).unwrap();
            crate::live::store::write_entry(&e.world.store, &c.state_entry(), &state.encode()).unwrap();
        } else {
            e.jump(-hour);
        }
        e.publish(&Publication::new(&[revoked("a"), record("b")], 1, 2));
        let took = e.run_until(2_000, |e| e.all_see(&key("a"), "revoked a"));
        assert!(took.is_some_and(|t| t <= 600), "planted {planted}: the revocation took {took:?}");
        e.origin().every_path = Some(Fault::Status(503));
        e.run_ms(3_500);
        assert_eq!(e.gauges(0).unwrap().seconds_since_sync, 3, "planted {planted}: the age counts again");
        assert_eq!(e.seen_by_all(&key("b")), "b");
    }
}

// ---------------------------------------------------------------------------------------------
// VM numbers

#[test]
fn vm_numbers_are_distinct_and_kept_across_reconfiguration() {
    let mut e = loaded(4, &records(&["live"]), 1);
    let numbers: Vec<u32> = e.vms.iter().map(|vm| vm.sync.me()).collect();
    let distinct: std::collections::HashSet<&u32> = numbers.iter().collect();
    assert_eq!(distinct.len(), 4);
    e.run_ms(1_000);
    let poller = e.requests_for(MANIFEST).last().unwrap().vm;
    let shards = e.world.origin.borrow().requests.len() - e.requests_for(MANIFEST).len();
    // A new configuration (ECDS, a WasmPlugin update) reaches every VM, the poller first.
    e.reconfigure(poller, &[]);
    for vm in (0..4).filter(|vm| *vm != poller) {
        e.reconfigure(vm, &[]);
    }
    assert_eq!(e.vms.iter().map(|vm| vm.sync.me()).collect::<Vec<_>>(), numbers);
    let seen = e.requests_for(MANIFEST).len();
    e.run_ms(2_000);
    let polls = poll_times(&e, seen);
    assert!(polls.iter().all(|(vm, _)| *vm == poller), "the lease left its VM: {polls:?}");
    assert!(gaps(&polls).iter().all(|g| *g == 500), "{polls:?}");
    assert_eq!(e.world.origin.borrow().requests.len() - e.requests_for(MANIFEST).len(), shards, "a shard refetched");
    assert_eq!(e.seen_by_all(&key("live")), "live", "a fresh configuration serves the loaded set at once");
}

// ---------------------------------------------------------------------------------------------
// A set that lacks a key retires it, whatever happened before (an outside attack's findings)

/// Publishes key K (in 1-digit shard "3") and others at `widths[0]`, loaded (or, with
/// `first_fails`, a first load that fails part-way after K's shard was written); then at each
/// middle width a publication whose sync fails part-way; then at the last width a set without K,
/// whose id a new key (`heir`, in shard `heir_prefix`) takes. After that sync, K must be refused
/// on every VM, the heir and every other key served.
fn a_removed_key_stays_removed(first_fails: bool, widths: &[usize], heir_prefix: &str) {
    let context = format!("first load fails: {first_fails}, widths {widths:?}, heir in {heir_prefix:?}");
    let k = id_in("victim", "3");
    let heir = id_in("heir", heir_prefix);
    let others: Vec<String> = (0..24).map(|i| format!("other{i}")).collect();
    let mut with_k: Vec<Value> = others.iter().map(|id| record(id)).collect();
    with_k.push(record(&k));
    // The shard the fake's sync asks for last, failed: every other one arrives first.
    let fail_last = |e: &mut Envoy, width: usize| {
        e.origin().faults.insert(Publication::served_path(&"0".repeat(width)), Fault::Status(500));
    };
    let mut e = Envoy::new(2, json!({}), &[]);
    let mut version = 1;
    e.publish(&Publication::new(&with_k, widths[0], version));
    if first_fails {
        fail_last(&mut e, widths[0]);
        e.run_until(2_000, |e| !e.failures().is_empty()).unwrap();
        if widths[0] > 0 {
            assert_eq!(e.seen_by_all(&key(&k)), k, "{context}: K's shard of the first load was written");
        }
        e.origin().faults.clear();
    } else {
        e.run_until_loaded(1, 2_000);
        assert_eq!(e.seen_by_all(&key(&k)), k, "{context}");
    }
    for &width in &widths[1..widths.len() - 1] {
        version += 1;
        let failures = e.failures().len();
        e.publish(&Publication::new(&with_k, width, version));
        fail_last(&mut e, width);
        e.run_until(RECOVERY_MS, |e| e.failures().len() > failures).unwrap();
        e.origin().faults.clear();
    }
    version += 1;
    let mut without_k: Vec<Value> = others.iter().map(|id| record(id)).collect();
    let mut heir_record = record(&heir);
    heir_record["id"] = json!(k);
    without_k.push(heir_record);
    e.publish(&Publication::new(&without_k, *widths.last().unwrap(), version));
    e.run_until_synced(&version.to_string(), RECOVERY_MS);
    e.run_ms(200);
    assert_eq!(e.seen_by_all(&key(&k)), "unknown", "{context}: the removed key still works");
    assert_eq!(e.seen_by_all(&key(&heir)), k, "{context}: the removed key's id is not free");
    for id in &others {
        assert_eq!(e.seen_by_all(&key(id)), *id, "{context}");
    }
    assert_eq!(e.gauges(0).unwrap().loaded.unwrap().keys, 25, "{context}");
}

#[test]
fn a_key_a_failed_sync_at_another_width_spared_is_retired_and_its_id_is_free() {
    // The attack: width 1 with K loaded; width 2 failing part-way; width 1 without K.
    a_removed_key_stays_removed(false, &[1, 2, 1], "3");
    a_removed_key_stays_removed(false, &[1, 2, 1], "a");
}

#[test]
fn a_key_a_failed_first_load_left_is_retired_by_a_set_of_another_width() {
    a_removed_key_stays_removed(true, &[2, 1], "3");
    a_removed_key_stays_removed(true, &[1, 0], "a");
    a_removed_key_stays_removed(true, &[2, 1, 2], "c");
    a_removed_key_stays_removed(true, &[1, 1], "3");
}

#[test]
fn removed_keys_stay_removed_through_every_sequence_of_widths() {
    let sequences: [&[usize]; 9] =
        [&[0, 1, 0], &[0, 2, 0], &[2, 1, 2], &[1, 0, 1], &[2, 0, 1], &[0, 1, 2, 0], &[1, 2, 0, 1], &[2, 2], &[0, 1]];
    for widths in sequences {
        for first_fails in [false, true] {
            a_removed_key_stays_removed(first_fails, widths, "3");
            a_removed_key_stays_removed(first_fails, widths, "e");
        }
    }
}

#[test]
fn a_late_answer_of_an_abandoned_sync_is_dropped_unread_and_changes_nothing() {
    let ids = ids_in_distinct_shards("late", 3);
    let mut e = loaded(1, &records(&[&ids[0]]), 1);
    // Version 2: the shard of ids[1] gets lost on the way, the shard of ids[2] answers 500, so
    // the sync fails while the first is still out.
    let v2 = Publication::new(&records(&[&ids[0], &ids[1], &ids[2]]), 1, 2);
    e.publish(&v2);
    let (late, failing) =
        (Publication::served_path(&prefix_of_id(&ids[1], 1)), Publication::served_path(&prefix_of_id(&ids[2], 1)));
    e.origin().faults.insert(late.clone(), Fault::Lost);
    e.origin().faults.insert(failing.clone(), Fault::Status(500));
    e.run_until(2_000, |e| !e.failures().is_empty()).unwrap();
    let (_, token, path) = e.pending().into_iter().find(|(_, _, p)| *p == late).unwrap();

    // The next sync waits for a manifest that never comes.
    e.origin().faults.insert(MANIFEST.into(), Fault::Lost);
    e.run_until(RECOVERY_MS, |e| e.vms[0].sync.syncing()).unwrap();
    e.run_ms(3_000);
    e.world.bodies_read.borrow_mut().clear();
    let events = e.vms[0].events.len();
    // The late answer arrives: the real shard, or a body no VM should copy.
    let body = e.origin().files[&late].clone();
    for canned in [
        Canned { path: path.clone(), status: 200, etag: None, size: body.len(), body: body.clone() },
        Canned { path: path.clone(), status: 200, etag: None, size: 1 << 30, body: Vec::new() },
        Canned { path: path.clone(), status: 0, etag: None, size: 0, body: Vec::new() },
    ] {
        e.hand(0, token, &canned);
    }
    assert!(e.world.bodies_read.borrow().is_empty(), "a late answer's body was read");
    assert_eq!(e.vms[0].events.len(), events, "a late answer changed something: {:#?}", e.log());
    assert!(e.vms[0].sync.syncing(), "a late answer ended the sync in progress");
    assert_eq!(e.seen(0, &key(&ids[1])), "unknown");
    // Nor does it count as an answer of the current sync: that one is abandoned at its own
    // start plus the silence limit, 3 s from now, not the full limit from the late answer.
    let took = e.run_until(10_000, |e| e.failures().len() == 2).unwrap();
    let limit = e.world.config.silence_limit_ms();
    assert!((limit - 3_000..=limit - 3_000 + 110).contains(&took), "abandoned {took} ms after the late answer");
    assert_eq!(e.failures()[1], "no answer from the key-set endpoint");

    e.origin().faults.clear();
    e.run_until_synced("2", RECOVERY_MS);
    assert_eq!(e.seen(0, &key(&ids[1])), ids[1]);
    assert_eq!(e.seen(0, &key(&ids[2])), ids[2]);
}

#[test]
fn a_store_refusing_writes_part_way_leaves_nothing_a_later_set_cannot_retire() {
    // Shared data full, say: from the n-th write on, every write fails, wherever the sync is.
    let k = id_in("victim", "3");
    let new = id_in("new", "3");
    for width in [1, 0] {
        for n in 0..40 {
            let context = format!("width {width}, writes fail after {n}");
            let mut e = loaded(1, &[record(&k), record("stays")], 1);
            e.publish(&Publication::new(&[record("stays"), record(&new)], width, 2));
            e.world.store.fail_writes_after(Some(n));
            e.run_ms(1_000);
            assert_ne!(e.seen(0, &key("stays")), "unavailable", "{context}");
            e.world.store.fail_writes_after(None);
            e.publish(&Publication::new(&[record("stays"), record(&new)], width, 3));
            e.run_until_synced("3", RECOVERY_MS + 1_000);
            assert_eq!(e.seen(0, &key(&k)), "unknown", "{context}");
            assert_eq!(e.seen(0, &key(&new)), new, "{context}");
            assert_eq!(e.seen(0, &key("stays")), "stays", "{context}");
            assert_eq!(e.gauges(0).unwrap().loaded.unwrap().keys, 2, "{context}");
        }
    }
}

#[test]
fn a_vm_that_stalled_mid_sync_past_its_lease_leaves_no_record_unlisted() {
    // VM A plans a sync of version 2 (shard X gains y), then stalls with shard X's answer on its
    // way, past its lease. VM B takes over and loads version 3 (shard X gains n too). A wakes up
    // and applies its version 2. Version 4 drops n again, with shard X as version 2 had it.
    let x = id_in("sx", "7");
    let (y, n) = (id_in("sy", "7"), id_in("sn", "7"));
    let mut e = loaded(2, &[record(&x)], 1);
    e.publish(&Publication::new(&[record(&x), record(&y)], 1, 2));
    e.origin().faults.insert(Publication::served_path("7"), Fault::Slow(200));
    e.run_until(2_000, |e| e.pending().iter().any(|(_, _, p)| p.ends_with("/7.json"))).unwrap();
    let a = e.pending()[0].0;
    e.vms[a].stalled = true;
    e.origin().faults.clear();
    e.publish(&Publication::new(&[record(&x), record(&y), record(&n)], 1, 3));
    e.run_until_synced("3", 5_000);
    assert_eq!(e.seen(1 - a, &key(&n)), n);
    e.vms[a].stalled = false;
    e.step();
    let state = crate::live::store::read_state(&e.world.store, &e.world.config).unwrap();
    assert_eq!(state.version, "3", "the stalled VM wrote its older set over the newer one");
    e.publish(&Publication::new(&[record(&x), record(&y)], 1, 4));
    e.run_until_synced("4", 5_000);
    e.run_ms(200);
    assert_eq!(e.seen_by_all(&key(&n)), "unknown", "{:#?}", e.log());
}

#[test]
fn a_lease_recreated_by_another_vm_while_a_sync_runs_does_not_drop_it() {
    // A VM that found the lease absent a moment ago creates it with no holder (shared data has no
    // create-if-absent): no VM holds it, so the sync in progress goes on.
    let mut e = loaded(2, &records(&["a"]), 1);
    e.publish(&Publication::new(&records(&["a", "b"]), 1, 2));
    e.origin().faults.insert(MANIFEST.into(), Fault::Slow(50));
    e.run_until(2_000, |e| e.vms.iter().any(|vm| vm.sync.syncing())).unwrap();
    let nobody = Lease { owner: 0, expires_ms: 0, next_due_ms: 0, failures: 0 };
    crate::live::store::write_entry(&e.world.store, &e.world.config.lease_entry(), &nobody.encode()).unwrap();
    e.run_until_synced("2", 200);
    assert!(e.log().iter().all(|line| !line.contains("dropped")), "{:#?}", e.log());
    assert_eq!(e.seen_by_all(&key("b")), "b");
}
