//! Property test of the key-set sync on the fake host: random publications (widths 0 to 2, random
//! key sets with revocations, now and then a duplicate id), random faults of the endpoint and of
//! the store, VMs stalling and being reconfigured, and random stretches of time. After every
//! stretch, once the VMs have ticked, whatever the state entry says has loaded is served exactly:
//! each key of that publication found with its record, every other key unknown, on every VM.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::*;
use crate::live::store::read_state;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The keys publications draw from.
const POOL: usize = 12;

#[derive(Debug, Clone)]
enum Op {
    /// A new version: the keys in `keys` (a bit each), those in `revoked` revoked; with `twin`, a
    /// second key under the first one's id (a set the sync must refuse).
    Publish {
        width: usize,
        keys: u16,
        revoked: u16,
        twin: bool,
    },
    /// A fault: on the manifest (`shard` None) or on one shard, of one kind.
    Fault {
        shard: Option<usize>,
        kind: usize,
    },
    ClearFaults,
    /// The store refuses every write after `n` more (`None`: writes succeed again).
    StoreWrites(Option<usize>),
    Stall(usize),
    Resume(usize),
    Reconfigure(usize),
    Run(i64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..=2usize, any::<u16>(), any::<u16>(), prop::bool::weighted(0.15))
            .prop_map(|(width, keys, revoked, twin)| Op::Publish { width, keys, revoked, twin }),
        2 => (prop::option::of(0..256usize), 0..7usize).prop_map(|(shard, kind)| Op::Fault { shard, kind }),
        2 => Just(Op::ClearFaults),
        1 => prop::option::weighted(0.6, 0..60usize).prop_map(Op::StoreWrites),
        1 => (0..3usize).prop_map(Op::Stall),
        1 => (0..3usize).prop_map(Op::Resume),
        1 => (0..3usize).prop_map(Op::Reconfigure),
        4 => (100..4_000i64).prop_map(Op::Run),
    ]
}

fn fault(kind: usize) -> Fault {
    match kind {
        0 => Fault::Status(503),
        1 => Fault::Down,
        2 => Fault::Slow(1_000),
        3 => Fault::Lost,
        4 => Fault::Body(b"<html>maintenance</html>".to_vec()),
        5 => Fault::Huge(1 << 30),
        _ => Fault::Slow(150),
    }
}

fn id(i: usize) -> String {
    format!("p{i}")
}

/// A publication's records by key id: (record id, revoked).
type Published = BTreeMap<String, (String, bool)>;

fn publication(keys: u16, revoked_keys: u16, twin: bool) -> (Vec<Value>, Published) {
    let mut records = Vec::new();
    let mut published = Published::new();
    for i in (0..POOL).filter(|i| keys & (1 << i) != 0) {
        let is_revoked = revoked_keys & (1 << i) != 0;
        let mut r = if is_revoked { revoked(&id(i)) } else { record(&id(i)) };
        if twin && !published.is_empty() && published.len() == 1 {
            // This key under the first key's id.
            let first = published.keys().next().unwrap().clone();
            r["id"] = json!(first);
        }
        published.insert(id(i), (r["id"].as_str().unwrap().to_string(), is_revoked));
        records.push(r);
    }
    (records, published)
}

/// What VM `vm` must answer for every key of the pool when `published` is loaded.
fn check(e: &Envoy, vm: usize, published: &Published, context: &str) -> Result<(), TestCaseError> {
    for i in 0..POOL {
        let want = match published.get(&id(i)) {
            Some((rid, true)) => format!("revoked {rid}"),
            Some((rid, false)) => rid.clone(),
            None => "unknown".into(),
        };
        let seen = e.seen(vm, &key(&id(i)));
        prop_assert_eq!(&seen, &want, "{}: VM {} key {}\n{:#?}", context, vm, id(i), e.log());
    }
    Ok(())
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut e = Envoy::new(3, json!({}), &[]);
    let mut versions: BTreeMap<String, Published> = BTreeMap::new();
    let mut version = 0u32;
    let mut width = 1;
    for (step, op) in ops.iter().enumerate() {
        match op {
            Op::Publish { width: w, keys, revoked, twin } => {
                version += 1;
                width = *w;
                let (records, published) = publication(*keys, *revoked, *twin);
                let mut ids: Vec<&String> = published.values().map(|(rid, _)| rid).collect();
                ids.sort();
                ids.dedup();
                let duplicate = ids.len() != published.len();
                e.publish(&Publication::new(&records, width, version));
                if !duplicate {
                    versions.insert(version.to_string(), published);
                }
            }
            Op::Fault { shard: None, kind } => {
                e.origin().faults.insert(MANIFEST.into(), fault(*kind));
            }
            Op::Fault { shard: Some(n), kind } => {
                let prefix = crate::live::ids::prefix_of((*n % (1 << (4 * width))) as u32, width);
                e.origin().faults.insert(Publication::served_path(&prefix), fault(*kind));
            }
            Op::ClearFaults => e.origin().faults.clear(),
            Op::StoreWrites(n) => e.world.store.fail_writes_after(*n),
            Op::Stall(vm) => e.vms[*vm].stalled = true,
            Op::Resume(vm) => e.vms[*vm].stalled = false,
            Op::Reconfigure(vm) => e.reconfigure(*vm, &[]),
            Op::Run(ms) => e.run_ms(*ms),
        }
        // After a stretch of time, once every VM that runs has ticked again (and dropped what it
        // had decoded), unless a write of data failed since the last good sync (shared data has no
        // transactions: the next good sync repairs what such a write left half done).
        if !matches!(op, Op::Run(_)) {
            continue;
        }
        e.run_ms(110);
        // A VM drops what it decoded on its next tick after a sync changes records, so a change
        // may trail the state entry by one tick (README, Key distribution): check once every VM
        // that runs has ticked since the last sync finished.
        let tick = e.world.config.tick_ms() as i64;
        for _ in 0..5 {
            let synced = read_state(&e.world.store, &e.world.config).map_or(i64::MIN, |s| s.synced_ms);
            if e.vms.iter().all(|vm| vm.stalled || vm.next_tick - tick > synced) {
                break;
            }
            e.run_ms(tick + 10);
        }
        if e.world.clean_at.get() != Some(e.world.store.data_write_failures()) {
            continue;
        }
        let context = format!("after step {step} of {ops:?}");
        if let Some(state) = read_state(&e.world.store, &e.world.config) {
            let published = versions.get(&state.version);
            prop_assert!(published.is_some(), "{}: version {} loaded, a set it must refuse", context, state.version);
            let published = published.unwrap();
            for vm in (0..e.vms.len()).filter(|vm| !e.vms[*vm].stalled) {
                check(&e, vm, published, &context)?;
            }
            prop_assert_eq!(state.keys, published.len() as u64, "{}: the key count", context);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn whatever_happens_the_loaded_version_is_served_exactly(ops in prop::collection::vec(op(), 1..24)) {
        run(ops)?;
    }
}
