//! Unit tests of the live key set's settings, formats, layout, lease and writes, each part on its
//! own (the sync as a whole: `sync_tests.rs`).
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::FakeStore;
use super::*;
use crate::keys::record::{compile_keys, RawKey};
use crate::keys::stored::{decode_key, encode_key, TOMBSTONE};
use crate::keys::{hash_key, Key, KeyHash, KeySet, Lookup};
use serde_json::json;
use std::collections::HashSet;

/// One shared-data write, as a test sees it.
struct Written {
    entry: String,
    value: Vec<u8>,
}

/// Runs `apply_sync` and collects its writes.
#[allow(clippy::too_many_arguments)]
fn writes_of(
    c: &KeySetConfig,
    manifest: &Manifest,
    fetched: &[FetchedShard],
    retired: Option<&Retired>,
    unchanged_keys: u64,
    etag: Option<String>,
    now: i64,
) -> Vec<Written> {
    let mut writes = Vec::new();
    apply_sync(c, manifest, fetched, retired, unchanged_keys, etag, now, &mut |entry, value| {
        writes.push(Written { entry: entry.to_string(), value: value.to_vec() });
        Ok(())
    })
    .unwrap();
    writes
}

fn config() -> KeySetConfig {
    let raw: RawKeySet = serde_json::from_value(json!({"cluster": "keyset", "path": "/keyset/manifest.json",
                                                        "poll_interval_ms": 500}))
    .unwrap();
    KeySetConfig::compile(&raw).unwrap()
}

fn record(id: &str, key: &str) -> serde_json::Value {
    json!({"id": id, "hash": hex::encode(hash_key(key.as_bytes())), "org": "org_1", "scopes": ["a", "b:*"],
           "attributes": {"venue": "v_7"}, "expires_at": 1_900_000_000})
}

/// A key whose hash starts with `prefix`, found by counting.
fn key_with_prefix(prefix: &str) -> String {
    (0..).map(|n| format!("sk_live_{n}")).find(|k| hex::encode(hash_key(k.as_bytes())).starts_with(prefix)).unwrap()
}

fn shard_ref(prefix: &str, body: &[u8]) -> ShardRef {
    ShardRef { prefix: prefix.into(), path: format!("shards/{prefix}.json"), etag: hash_key(body) }
}

#[test]
fn settings_have_defaults_and_limits() {
    let raw: RawKeySet = serde_json::from_value(json!({"cluster": "keyset", "path": "/m.json"})).unwrap();
    let c = KeySetConfig::compile(&raw).unwrap();
    assert_eq!((c.authority.as_str(), c.poll_interval_ms, c.timeout_ms), ("keyset", 2_000, 1_000));
    for (bad, field) in [
        (json!({"cluster": "", "path": "/m"}), "key_set.cluster"),
        (json!({"cluster": "k", "path": "m"}), "key_set.path"),
        (json!({"cluster": "k", "path": "/m", "poll_interval_ms": 5}), "key_set.poll_interval_ms"),
        (json!({"cluster": "k", "path": "/m", "timeout_ms": 0}), "key_set.timeout_ms"),
    ] {
        let raw: RawKeySet = serde_json::from_value(bad).unwrap();
        assert_eq!(KeySetConfig::compile(&raw).unwrap_err().field, field);
    }
}

#[test]
fn namespaces_differ_per_endpoint() {
    let a = config();
    let raw: RawKeySet = serde_json::from_value(json!({"cluster": "other", "path": "/keyset/manifest.json"})).unwrap();
    let b = KeySetConfig::compile(&raw).unwrap();
    assert_ne!(a.namespace, b.namespace);
    assert_eq!(a.key_entry(&[0; 32]), format!("k{}{}", a.namespace, "A".repeat(43)));
    assert_eq!(a.key_entry(&[0xff; 32]).len(), 52);
    // 0xfb 0xfb 0xfb is 111110 111111 101111 111011 in sextets: "-_v7".
    assert_eq!(a.key_entry(&[0xfb; 32]), format!("k{}{}-_s", a.namespace, "-_v7".repeat(10)));
}

#[test]
fn shard_paths_resolve_against_the_manifest_directory() {
    let c = config();
    assert_eq!(c.shard_request_path("shards/0.json"), "/keyset/shards/0.json");
    assert_eq!(c.shard_request_path("/elsewhere/0.json"), "/elsewhere/0.json");
}

#[test]
fn retries_back_off_up_to_a_cap() {
    let c = config();
    let waits: Vec<u64> = (0..6).map(|n| c.retry_after_ms(n)).collect();
    assert_eq!(waits, [500, 1_000, 2_000, 4_000, 5_000, 5_000]);
    let raw: RawKeySet =
        serde_json::from_value(json!({"cluster": "k", "path": "/m", "poll_interval_ms": 20_000})).unwrap();
    assert_eq!(KeySetConfig::compile(&raw).unwrap().retry_after_ms(5), 30_000);
}

#[test]
fn manifest_must_cover_every_prefix_once() {
    let etag = "a".repeat(64);
    let m = |shards: serde_json::Value| parse_manifest(json!({"version": 7, "shards": shards}).to_string().as_bytes());
    let one = m(json!([{"prefix": "", "path": "all.json", "etag": etag}])).unwrap();
    assert_eq!((one.version.as_str(), one.shards.len()), ("7", 1));
    let sixteen: Vec<_> =
        (0..16).map(|n| json!({"prefix": format!("{n:X}"), "path": "p", "etag": format!("\"{etag}\"")})).collect();
    assert_eq!(m(json!(sixteen)).unwrap().shards[10].prefix, "a");
    let mut dup = sixteen.clone();
    dup[3] = json!({"prefix": "2", "path": "p", "etag": etag});
    assert_eq!(m(json!(dup)).unwrap_err().field, "manifest.shards[3].prefix");
    assert_eq!(m(json!(sixteen[..15])).unwrap_err().field, "manifest.shards");
    assert_eq!(m(json!([{"prefix": "", "path": "p", "etag": "abc"}])).unwrap_err().field, "manifest.shards[0].etag");
    assert!(parse_manifest(b"<html>oops</html>").is_err());
    assert!(parse_manifest(br#"{"version": 1, "shards": [], "extra": 1}"#).is_err());
}

#[test]
fn shard_is_checked_against_its_etag_and_prefix() {
    let k0 = key_with_prefix("0");
    let body = json!({"keys": [record("a", &k0)]}).to_string().into_bytes();
    let keys = parse_shard(&shard_ref("0", &body), &body).unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].0, hash_key(k0.as_bytes()));

    let truncated = &body[..body.len() / 2];
    let err = parse_shard(&shard_ref("0", &body), truncated).unwrap_err();
    assert!(err.message().contains("does not match its etag"), "{err}");

    let k1 = key_with_prefix("1");
    let wrong = json!({"keys": [record("b", &k1)]}).to_string().into_bytes();
    let err = parse_shard(&shard_ref("0", &wrong), &wrong).unwrap_err();
    assert_eq!(err.field, "shard \"0\" (shards/0.json): keys[0].hash");

    let bad = br#"{"keys": [{"id": "x"}]}"#;
    let err = parse_shard(&shard_ref("", bad), bad).unwrap_err();
    assert!(err.field.starts_with("shard \"\" (shards/.json): keys[0]"), "{err}");
}

#[test]
fn records_round_trip_through_shared_data_encoding() {
    let body = json!({"keys": [record("a", "k1"), {"id": "b", "hash": "0".repeat(64), "org": "o", "revoked": true}]});
    let raw: Vec<RawKey> = serde_json::from_value(body["keys"].clone()).unwrap();
    let entries = compile_keys(&raw, "keys").unwrap().into_entries();
    for (_, key) in entries {
        assert_eq!(decode_key(&encode_key(&key)), Some(key));
    }
    assert_eq!(decode_key(TOMBSTONE), None);
    assert_eq!(decode_key(b""), None);
    let full = encode_key(
        &compile_keys(&[serde_json::from_value(record("a", "k")).unwrap()], "k").unwrap().into_entries()[0].1,
    );
    for cut in 0..full.len() {
        assert_eq!(decode_key(&full[..cut]), None, "a record cut at {cut} bytes must not decode");
    }
}

#[test]
fn a_sync_writes_records_tombstones_indexes_then_state() {
    let c = config();
    let (ka, kb, kc) = (key_with_prefix("0"), key_with_prefix("00"), key_with_prefix("01"));
    let body = json!({"keys": [record("a", &ka), record("c", &kc)]}).to_string().into_bytes();
    let shard = shard_ref("0", &body);
    let keys = parse_shard(&shard, &body).unwrap();
    let fetched_shard = shard.clone();
    let previous = ShardIndex {
        etag: [9; 32],
        hashes: vec![hash_key(ka.as_bytes()), hash_key(kb.as_bytes())],
        ids: vec![id_digest("a"), id_digest("b")],
    };
    let manifest = Manifest { version: "42".into(), shards: vec![shard.clone()] };
    let fetched = [FetchedShard::new(fetched_shard, keys, Some(previous), &KeySet::default()).unwrap()];
    // 8 keys in the shards not fetched, and the 2 of this one.
    let writes = writes_of(&c, &manifest, &fetched, None, 8, Some("\"e1\"".into()), 5_000);

    let value = |entry: &str| writes.iter().rev().find(|w| w.entry == entry).map(|w| w.value.clone());
    assert_eq!(value(&c.key_entry(&hash_key(kb.as_bytes()))).as_deref(), Some(TOMBSTONE));
    assert_eq!(decode_key(&value(&c.key_entry(&hash_key(kc.as_bytes()))).unwrap()).unwrap().id, "c");
    let index = ShardIndex::decode(&value(&c.shard_entry("0")).unwrap()).unwrap();
    let (a, c_) = (hash_key(ka.as_bytes()), hash_key(kc.as_bytes()));
    assert_eq!((index.etag, index.hashes, index.ids), (shard.etag, vec![a, c_], vec![id_digest("a"), id_digest("c")]));
    // Before any record, an index listing the old records and the new one: whatever stops the
    // writes, each record in shared data stays listed somewhere.
    assert_eq!(writes[0].entry, c.shard_entry("0"));
    let pending = ShardIndex::decode(&writes[0].value).unwrap();
    assert_eq!((pending.etag, pending.hashes), (PENDING_ETAG, vec![a, hash_key(kb.as_bytes()), c_]));
    let last = writes.last().unwrap();
    assert_eq!(last.entry, c.state_entry(), "the state is written last");
    let state = SyncState::decode(&last.value).unwrap();
    assert_eq!(
        state,
        SyncState {
            version: "42".into(),
            keys: 10,
            synced_ms: 5_000,
            manifest_etag: Some("\"e1\"".into()),
            width: Some(1)
        }
    );
    assert_eq!(state.version_number(), Some(42));
}

#[test]
fn a_shard_key_that_is_also_inline_refuses_the_sync() {
    let body = json!({"keys": [record("a", "k1")]}).to_string().into_bytes();
    let shard = shard_ref("", &body);
    let keys = parse_shard(&shard, &body).unwrap();
    let inline = compile_keys(&[serde_json::from_value(record("inline", "k1")).unwrap()], "keys").unwrap();
    let err = FetchedShard::new(shard, keys, None, &inline).unwrap_err();
    assert!(err.message().contains("also an inline key"), "{err}");
}

#[test]
fn lease_is_held_until_it_expires() {
    let held = Lease { owner: 1, expires_ms: 1_000, next_due_ms: 700, failures: 2 };
    assert_eq!(Lease::decode(&held.encode()), Some(held));
    assert_eq!(Lease::decode(b"1,2,3"), None);
    assert_eq!(Lease::claim(Some(held), 2, 999, 3_000), None, "another VM holds it");
    assert_eq!(Lease::claim(Some(held), 2, 1_000, 3_000), Some(Lease { owner: 2, expires_ms: 4_000, ..held }));
    assert_eq!(Lease::claim(Some(held), 1, 500, 3_000), Some(Lease { expires_ms: 3_500, ..held }), "renewal");
    let renewed = Lease { expires_ms: 3_005, ..held };
    assert_eq!(Lease::claim(Some(renewed), 2, 0, 3_000), None, "renewed just after VM 2 read its clock");
    let forged = Lease { expires_ms: 6_001, ..held };
    assert_eq!(Lease::claim(Some(forged), 2, 0, 3_000).map(|l| l.owner), Some(2), "set against another clock");
    assert_eq!(
        Lease::claim(None, 3, 10, 3_000),
        Some(Lease { owner: 3, expires_ms: 3_010, next_due_ms: 10, failures: 0 })
    );
}

#[test]
fn shard_index_round_trips() {
    let index = ShardIndex { etag: [1; 32], hashes: vec![[2; 32], [3; 32]], ids: vec![7, u32::MAX] };
    assert_eq!(ShardIndex::decode(&index.encode()), Some(index));
    assert_eq!(ShardIndex::decode(&[0; 31]), None);
    assert_eq!(ShardIndex::decode(&[0; 32 + 35]), None);
    assert_eq!(ShardIndex::decode(TOMBSTONE), None, "a voided index decodes as nothing");
}

#[test]
fn a_new_shard_layout_replaces_the_whole_set() {
    let c = config();
    let (kept, dropped) = (key_with_prefix("3"), key_with_prefix("a"));
    let body = json!({"keys": [record("k", &kept)]}).to_string().into_bytes();
    let shard = shard_ref("", &body);
    let keys = parse_shard(&shard, &body).unwrap();
    let manifest = Manifest { version: "2".into(), shards: vec![shard.clone()] };
    let retired = Retired {
        prefixes: prefixes(1).collect(),
        hashes: vec![hash_key(kept.as_bytes()), hash_key(dropped.as_bytes())],
    };
    let fetched = [FetchedShard::new(shard, keys, None, &KeySet::default()).unwrap()];
    let writes = writes_of(&c, &manifest, &fetched, Some(&retired), 8, None, 9);
    let value = |entry: &str| writes.iter().rev().find(|w| w.entry == entry).map(|w| w.value.clone());
    assert_eq!(value(&c.key_entry(&hash_key(dropped.as_bytes()))).as_deref(), Some(TOMBSTONE));
    assert_eq!(decode_key(&value(&c.key_entry(&hash_key(kept.as_bytes()))).unwrap()).unwrap().id, "k");
    for p in prefixes(1) {
        assert_eq!(ShardIndex::decode(&value(&c.shard_entry(&p)).unwrap()), None, "old index {p:?} voided");
    }
    assert!(ShardIndex::decode(&value(&c.shard_entry("")).unwrap()).is_some());
    let state = SyncState::decode(&writes.last().unwrap().value).unwrap();
    assert_eq!((state.keys, state.width), (1, Some(0)));
}

#[test]
fn prefixes_enumerate_a_layout() {
    assert_eq!(prefixes(0).collect::<Vec<_>>(), [""]);
    assert_eq!(prefixes(1).count(), 16);
    assert_eq!(prefixes(2).nth(255).as_deref(), Some("ff"));
}

#[test]
fn sync_state_round_trips() {
    for state in [
        SyncState::default(),
        SyncState {
            version: "v 1.2".into(),
            keys: 7,
            synced_ms: -3,
            manifest_etag: Some("\"abc\"".into()),
            width: Some(2),
        },
    ] {
        assert_eq!(SyncState::decode(&state.encode()), Some(state));
    }
    assert_eq!(SyncState::decode(b"1\nx\n0\n-\n"), None);
}

#[test]
fn long_fields_round_trip_through_varint_lengths() {
    let key = Key {
        id: "i".repeat(300),
        org: "o".repeat(20_000),
        name: Some("n".repeat(127)),
        scopes: vec!["s".repeat(128)],
        attributes: vec![("a".into(), "v".repeat(16_384))],
        expires_at_ms: Some(-5),
        revoked: true,
    };
    assert_eq!(decode_key(&encode_key(&key)), Some(key));
}

fn settings(extra: serde_json::Value) -> KeySetConfig {
    let mut raw = json!({"cluster": "k", "path": "/m"});
    raw.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    KeySetConfig::compile(&serde_json::from_value(raw).unwrap()).unwrap()
}

#[test]
fn body_limits_have_defaults_and_bounds() {
    let c = settings(json!({}));
    assert_eq!((c.max_manifest_bytes, c.max_shard_bytes), (1 << 20, 64 << 20));
    let c = settings(json!({"max_manifest_bytes": 4096, "max_shard_bytes": 2048}));
    assert_eq!(c.refuse_body(Fetched::Manifest, 4096), None);
    assert_eq!(
        c.refuse_body(Fetched::Manifest, 4097).as_deref(),
        Some("manifest: the body is 4097 bytes, more than key_set.max_manifest_bytes (4096)")
    );
    assert_eq!(
        c.refuse_body(Fetched::Shard("3f"), 2049).as_deref(),
        Some("shard \"3f\": the body is 2049 bytes, more than key_set.max_shard_bytes (2048)")
    );
    for (bad, field) in [
        (json!({"max_manifest_bytes": 1023}), "key_set.max_manifest_bytes"),
        (json!({"max_manifest_bytes": (64u64 << 20) + 1}), "key_set.max_manifest_bytes"),
        (json!({"max_shard_bytes": 0}), "key_set.max_shard_bytes"),
        (json!({"max_shard_bytes": (1u64 << 30) + 1}), "key_set.max_shard_bytes"),
    ] {
        let mut raw = json!({"cluster": "k", "path": "/m"});
        raw.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let err = KeySetConfig::compile(&serde_json::from_value(raw).unwrap()).unwrap_err();
        assert_eq!(err.field, field);
    }
}

#[test]
fn deeply_nested_manifest_is_refused_at_once_naming_the_field() {
    let body = crate::fuzzing::nested_manifest(2 << 20);
    let start = std::time::Instant::now();
    let err = parse_manifest(&body).unwrap_err();
    let took = start.elapsed();
    assert_eq!(err.field, "manifest: version[0][0][0][0][0][0]");
    assert_eq!(err.message(), "nested more than 8 levels deep");
    assert!(took < std::time::Duration::from_millis(100), "2 MiB refused in {took:?}");
}

#[test]
fn a_version_or_expiry_of_the_wrong_type_is_refused_at_its_first_character() {
    // Wide rather than deep: within the depth limit, a megabyte of arrays under `version`.
    let mut body = br#"{"version": ["#.to_vec();
    while body.len() < 1 << 20 {
        body.extend_from_slice(b"[[1]],");
    }
    body.extend_from_slice(br#"[]], "shards": []}"#);
    let err = parse_manifest(&body).unwrap_err();
    assert_eq!(err.field, "manifest: version");
    assert!(
        err.message()
            .starts_with("invalid type: sequence, expected a string or a non-negative integer at line 1 column 13"),
        "{err}"
    );

    let mut shard = br#"{"keys": [{"id": "a", "hash": "x", "org": "o", "expires_at": ["#.to_vec();
    while shard.len() < 1 << 20 {
        shard.extend_from_slice(b"[[1]],");
    }
    shard.extend_from_slice(b"[]]}]}");
    let err = parse_shard(&shard_ref("", &shard), &shard).unwrap_err();
    assert_eq!(err.field, "shard \"\" (shards/.json): keys[0].expires_at");
    assert!(
        err.message().starts_with("invalid type: sequence, expected RFC 3339 text or integer Unix seconds"),
        "{err}"
    );
}

#[test]
fn two_vms_never_get_one_number_even_when_both_create_the_counter() {
    let (c, store) = (config(), FakeStore::default());
    let a = number_vm(&store, &c).unwrap();
    // What a second VM does when it, too, found the counter absent a moment ago: it creates the
    // entry unconditionally, after the first VM's increment, which resets the count.
    store.set(&c.vmseq_entry(), b"0", None).unwrap();
    let b = number_vm(&store, &c).unwrap();
    let d = number_vm(&store, &c).unwrap();
    assert_ne!(a, b, "the count went back to 0, so counting would have given both VMs number 1");
    assert_ne!(b, d);
    assert_ne!(a, d);
    assert!(a != 0 && b != 0 && d != 0, "0 means no holder in the lease");
}

#[test]
fn an_absent_lease_is_created_and_claimed_from_the_next_tick() {
    let (c, store) = (config(), FakeStore::default());
    assert_eq!(hold_lease(&store, &c, 7, 1_000).unwrap(), None, "created, not claimed");
    // Another VM that also found it absent creates it again a moment later: no claim to overwrite.
    store
        .set(&c.lease_entry(), &Lease { owner: 0, expires_ms: 0, next_due_ms: 0, failures: 0 }.encode(), None)
        .unwrap();
    let held = hold_lease(&store, &c, 7, 1_100).unwrap().unwrap();
    assert_eq!(held, Lease { owner: 7, expires_ms: 1_100 + c.lease_ttl_ms(), next_due_ms: 0, failures: 0 });
    assert_eq!(hold_lease(&store, &c, 8, 1_200).unwrap(), None, "held by VM 7");
}

#[test]
fn a_failure_counts_in_the_backoff_even_after_the_lease_moved() {
    let (c, store) = (config(), FakeStore::default());
    hold_lease(&store, &c, 1, 0).unwrap();
    hold_lease(&store, &c, 1, 10).unwrap().unwrap();
    // VM 1's sync fails once; then it stalls past its lease, VM 2 takes over, and VM 1's sync
    // fails again: the failure counts, and the wait doubles.
    update_lease(&store, &c, |l| l.after_failure(100, &c)).unwrap();
    let ttl = c.lease_ttl_ms();
    let moved = hold_lease(&store, &c, 2, 10 + ttl).unwrap().unwrap();
    assert_eq!((moved.owner, moved.failures), (2, 1));
    let after = update_lease(&store, &c, |l| l.after_failure(20 + ttl, &c)).unwrap();
    assert_eq!((after.owner, after.failures, after.next_due_ms), (2, 2, 20 + ttl + 2_000));
    let after = update_lease(&store, &c, |l| l.after_failure(30 + ttl, &c)).unwrap();
    assert_eq!((after.failures, after.next_due_ms), (3, 30 + ttl + 4_000));
    let good = update_lease(&store, &c, |l| l.after_success(40 + ttl, &c)).unwrap();
    assert_eq!((good.failures, good.next_due_ms), (0, 40 + ttl + 500));
}

#[test]
fn polls_keep_their_interval_on_the_monotonic_clock() {
    // The schedule takes only monotonic time (the filter passes Envoy's steady clock; the wall
    // clock reaches nothing here), so a wall-clock step cannot move a poll: ticks every 100 ms,
    // polls every 500 ms.
    let (c, store) = (config(), FakeStore::default());
    let mut polls = Vec::new();
    hold_lease(&store, &c, 1, 0).unwrap();
    for tick in 1..=50i64 {
        let mono = tick * 100;
        let lease = hold_lease(&store, &c, 1, mono).unwrap().unwrap();
        if lease.due(mono, &c) {
            polls.push(mono);
            update_lease(&store, &c, |l| l.after_success(mono, &c)).unwrap();
        }
    }
    assert_eq!(polls, [100, 600, 1_100, 1_600, 2_100, 2_600, 3_100, 3_600, 4_100, 4_600]);
    assert_eq!(seconds_since(2_100, 4_999), 2);
    assert_eq!(seconds_since(5_000, 4_000), 0, "never negative");
}

#[test]
fn a_schedule_or_lease_set_against_a_clock_that_stepped_back_is_not_waited_out() {
    // What a VM sees when the times in shared data came from a clock an hour ahead of its own: a
    // due time and a lease expiry an hour off.
    let c = config();
    let hour = 3_600_000;
    let stale = Lease { owner: 2, expires_ms: 10_000 + hour, next_due_ms: 10_000 + hour, failures: 0 };
    assert!(stale.due(10_000, &c), "a due time past the longest backoff is due now");
    assert!(!Lease { next_due_ms: 10_000 + c.max_wait_ms() as i64, ..stale }.due(10_000, &c));
    let claimed = Lease::claim(Some(stale), 1, 10_000, c.lease_ttl_ms()).unwrap();
    assert_eq!((claimed.owner, claimed.expires_ms), (1, 10_000 + c.lease_ttl_ms()));
    let fresh = Lease { expires_ms: 10_000 + c.lease_ttl_ms(), ..stale };
    assert_eq!(Lease::claim(Some(fresh), 1, 10_000, c.lease_ttl_ms()), None, "a lease within its ttl holds");
}

/// Shared data as a map, written through `apply_shard`/`retire` and read back.
fn apply_to(store: &FakeStore, run: impl FnOnce(&mut Write) -> Result<(), String>) {
    run(&mut |entry, value| store::write_entry(store, entry, value)).unwrap();
}

fn stored(store: &FakeStore, entry: &str) -> Option<Vec<u8>> {
    store.get(entry).unwrap().map(|(v, _)| v)
}

#[test]
fn records_a_failed_first_load_left_in_another_width_are_retired_by_the_next_set() {
    let c = config();
    let store = FakeStore::default();
    let (left, kept) = (key_with_prefix("3"), key_with_prefix("a"));
    // A first load of 16 shards wrote shard "3" (and listed width 1), then failed: no state.
    let body = json!({"keys": [record("left", &left)]}).to_string().into_bytes();
    let shard = shard_ref("3", &body);
    let fetched =
        FetchedShard::new(shard.clone(), parse_shard(&shard, &body).unwrap(), None, &KeySet::default()).unwrap();
    store.set(&c.widths_entry(), width_bit(1).to_string().as_bytes(), None).unwrap();
    apply_to(&store, |w| apply_shard(&c, &fetched, w));
    assert!(decode_key(&stored(&store, &c.key_entry(&hash_key(left.as_bytes()))).unwrap()).is_some());

    // The next publication has one shard, without that key.
    let mask = decode_widths(&stored(&store, &c.widths_entry()).unwrap());
    assert_eq!(stale_widths(mask, None, 0), [1], "nothing loaded, yet width 1 holds records");
    let mut retired = Retired::default();
    for prefix in prefixes(1) {
        if let Some(index) = stored(&store, &c.shard_entry(&prefix)).and_then(|b| ShardIndex::decode(&b)) {
            retired.hashes.extend(index.hashes);
        }
        retired.prefixes.push(prefix);
    }
    let body = json!({"keys": [record("kept", &kept)]}).to_string().into_bytes();
    let shard = shard_ref("", &body);
    let fetched =
        FetchedShard::new(shard.clone(), parse_shard(&shard, &body).unwrap(), None, &KeySet::default()).unwrap();
    apply_to(&store, |w| apply_shard(&c, &fetched, w));
    let kept_hashes: HashSet<&KeyHash> = fetched.records.iter().map(|(h, _)| h).collect();
    apply_to(&store, |w| retire(&c, &retired, &kept_hashes, 0, w));

    assert_eq!(stored(&store, &c.key_entry(&hash_key(left.as_bytes()))).as_deref(), Some(TOMBSTONE));
    assert_eq!(decode_key(&stored(&store, &c.key_entry(&hash_key(kept.as_bytes()))).unwrap()).unwrap().id, "kept");
    assert_eq!(stored(&store, &c.shard_entry("3")).as_deref(), Some(TOMBSTONE));
    assert_eq!(decode_widths(&stored(&store, &c.widths_entry()).unwrap()), width_bit(0));
    assert_eq!(stale_widths(width_bit(0), Some(0), 0), Vec::<usize>::new());
    assert_eq!(stale_widths(width_bit(0), Some(0), 2), [0]);
}

#[test]
fn an_id_loaded_in_another_shard_refuses_the_shard_naming_both_places() {
    let c = config();
    let store = FakeStore::default();
    // Shard "a" holds, at keys[1], a record with id "k_1".
    let mut in_a =
        (0..).map(|n| format!("sk_live_{n}")).filter(|k| hex::encode(hash_key(k.as_bytes())).starts_with('a'));
    let (a0, a1) = (in_a.next().unwrap(), in_a.next().unwrap());
    let body = json!({"keys": [record("k_0", &a0), record("k_1", &a1)]}).to_string().into_bytes();
    let shard_a = shard_ref("a", &body);
    let stored_a =
        FetchedShard::new(shard_a.clone(), parse_shard(&shard_a, &body).unwrap(), None, &KeySet::default()).unwrap();
    apply_to(&store, |w| apply_shard(&c, &stored_a, w));
    let index_a = ShardIndex::decode(&stored(&store, &c.shard_entry("a")).unwrap()).unwrap();

    let mut ids = IdIndex::new(std::sync::Arc::new(inline_ids(&KeySet::default())));
    ids.add(shard_number("a"), index_a.ids);
    // Shard "3" lists another key under the same id, at keys[1].
    let body = json!({"keys": [record("k_9", &key_with_prefix("3")), record("k_1", &key_with_prefix("30"))]})
        .to_string()
        .into_bytes();
    let shard_3 = shard_ref("3", &body);
    let keys = parse_shard(&shard_3, &body).unwrap();
    let place_of = |place: u32, digest: u32, id: &str| {
        let prefix = prefix_of(place, 1);
        stored_position(&c, &store, &prefix, digest, id).map(|i| format!("shard {prefix:?} keys[{i}].id"))
    };
    let err = ids.check(&shard_3, &keys, place_of).unwrap_err();
    assert_eq!(err.field, "shard \"3\" (shards/3.json): keys[1].id");
    assert_eq!(err.message(), "\"k_1\" is also shard \"a\" keys[1].id");

    // A digest that matches an id it is not (digests collide) refuses nothing.
    assert_eq!(ids.check(&shard_3, &keys, |_, _, _| None), Ok(()));
}

#[test]
fn an_id_also_inline_refuses_the_shard() {
    let inline = compile_keys(&[serde_json::from_value(record("k_1", "sk_inline")).unwrap()], "keys").unwrap();
    let ids = IdIndex::new(std::sync::Arc::new(inline_ids(&inline)));
    let body = json!({"keys": [record("k_1", "sk_in_shard")]}).to_string().into_bytes();
    let shard = shard_ref("", &body);
    let keys = parse_shard(&shard, &body).unwrap();
    let err = ids
        .check(&shard, &keys, |place, _, id| {
            assert_eq!(place, INLINE);
            inline_place(&inline, id)
        })
        .unwrap_err();
    assert_eq!(err.field, "shard \"\" (shards/.json): keys[0].id");
    assert_eq!(err.message(), "\"k_1\" is also the id of an inline key (the configuration's `keys`)");
}

#[test]
fn shard_numbers_and_prefixes_convert_both_ways() {
    for (prefix, width) in [("", 0), ("f", 1), ("0a", 2), ("ffff", 4)] {
        assert_eq!(prefix_of(shard_number(prefix), width), prefix);
    }
    assert_ne!(shard_number("ffff"), INLINE);
}

#[test]
fn a_digest_two_shards_hold_sends_the_check_to_every_shard() {
    // Digests collide: once two shards hold one, the check cannot tell which to look in.
    let mut ids = IdIndex::default();
    let digest = id_digest("k_1");
    ids.add(shard_number("a"), [digest]);
    ids.add(shard_number("a"), [digest]);
    let body = json!({"keys": [record("k_1", "sk_x")]}).to_string().into_bytes();
    let shard = shard_ref("", &body);
    let keys = parse_shard(&shard, &body).unwrap();
    let asked = std::cell::RefCell::new(Vec::new());
    let ask = |place: u32, _: u32, _: &str| {
        asked.borrow_mut().push(place);
        None
    };
    assert_eq!(ids.check(&shard, &keys, ask), Ok(()));
    ids.add(shard_number("b"), [digest]);
    assert_eq!(ids.check(&shard, &keys, ask), Ok(()));
    assert_eq!(*asked.borrow(), [shard_number("a"), SEVERAL]);
}

#[test]
fn the_shared_live_set_reads_the_store_as_the_per_vm_one_does() {
    let store = MemoryStore::new();
    let (cached, shared) = (LiveSet::new(config()), SharedLiveSet::new(config()));
    let key = Key {
        id: "0000aaaa".into(),
        org: "org_1".into(),
        name: None,
        scopes: vec![],
        attributes: vec![],
        expires_at_ms: None,
        revoked: false,
    };
    let (known, removed, unknown) = (hash_key(b"known"), hash_key(b"removed"), hash_key(b"unknown"));
    let outcome = |set: &dyn Fn(&KeyHash) -> Lookup<'static>, hash: &KeyHash| match set(hash) {
        Lookup::Found(key) => format!("found {}", key.id),
        Lookup::NotFound => "not found".to_string(),
        Lookup::Unavailable => "unavailable".to_string(),
    };
    let both = |hash: &KeyHash| {
        let a = outcome(&|h| cached.find(&store, h).unwrap(), hash);
        let b = outcome(&|h| shared.find(&store, h).unwrap(), hash);
        assert_eq!(a, b);
        a
    };
    assert_eq!(both(&unknown), "unavailable", "before the first load");
    store.set(&config().key_entry(&known), &encode_key(&key), None).unwrap();
    store.set(&config().key_entry(&removed), TOMBSTONE, None).unwrap();
    assert_eq!(both(&known), "found 0000aaaa", "a shard of a first load, applied as it arrived");
    assert_eq!(both(&removed), "not found");
    assert_eq!(both(&unknown), "unavailable");
    let state = SyncState { version: "1".into(), keys: 1, synced_ms: 0, manifest_etag: None, width: Some(1) };
    store.set(&config().state_entry(), &state.encode(), None).unwrap();
    assert_eq!(both(&unknown), "not found", "once loaded");
    assert!(shared.loaded(&store));
}

#[test]
fn a_native_host_can_share_the_sync_and_the_lookup_across_threads() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send::<Syncer>();
    send::<LiveSet>();
    send_sync::<SharedLiveSet>();
    send_sync::<MemoryStore>();
}

#[test]
fn a_released_lease_is_claimed_by_the_next_vm_at_once_and_keeps_its_schedule() {
    let (store, config) = (MemoryStore::new(), config());
    assert_eq!(hold_lease(&store, &config, 1, 1_000).unwrap(), None, "the first tick creates the lease");
    let held = hold_lease(&store, &config, 1, 1_000).unwrap().unwrap();
    update_lease(&store, &config, |l| Lease { next_due_ms: 9_000, failures: 2, ..l }).unwrap();
    assert_eq!(hold_lease(&store, &config, 2, 1_100).unwrap(), None, "held by VM 1");
    release_lease(&store, &config, 2).unwrap();
    assert_eq!(hold_lease(&store, &config, 2, 1_100).unwrap(), None, "only its holder releases it");
    release_lease(&store, &config, held.owner).unwrap();
    let taken = hold_lease(&store, &config, 2, 1_200).unwrap().unwrap();
    assert_eq!((taken.owner, taken.next_due_ms, taken.failures), (2, 9_000, 2));
}
