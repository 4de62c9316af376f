//! Several VMs of one process, each with a [`Worker`], over one fake shared store and one
//! receiver, in simulated time: exactly one of them reports, with every VM's counts; a reporter
//! that goes away or stalls hands its counts to the next; a failing store loses nothing.
//!
//! Settings: a 10 s flush interval (a 1 s tick, a 3 s lease), a 2 s timeout.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::{config, Fault, Receiver, Status, Totals, NODE, WALL0_S};
use crate::live::fake::FakeStore;
use crate::live::lease::number_vm_in;
use crate::reply::DenyKind;
use crate::usage::report::Report;
use crate::usage::reporter::Event;
use crate::usage::tally::{Outcome, Tally};
use crate::usage::worker::{Now, Worker};
use serde_json::json;
use std::collections::HashSet;

const STEP_MS: i64 = 10;

struct Vm {
    worker: Worker,
    tally: Tally,
    /// Not ticked (a worker thread held up), but alive.
    stalled: bool,
    /// Gone (its configuration replaced); never ticked again.
    gone: bool,
}

struct Process {
    store: FakeStore,
    receiver: Receiver,
    vms: Vec<Vm>,
    /// Every event, with the VM that reported it.
    events: Vec<(usize, Event)>,
    recorded: Totals,
    now: i64,
    next_tick: i64,
}

impl Process {
    fn new(vms: usize) -> Process {
        let config = config(&json!({}));
        let store = FakeStore::default();
        crate::usage::shared::prepare(&store, &config.tally_entry()).unwrap();
        let vms = (0..vms)
            .map(|_| {
                let me = number_vm_in(&store, &config.vmseq_entry()).unwrap();
                Vm {
                    worker: Worker::new(config.clone(), me, NODE),
                    tally: config.tally(WALL0_S),
                    stalled: false,
                    gone: false,
                }
            })
            .collect();
        let mut p = Process {
            store,
            receiver: Receiver::default(),
            vms,
            events: Vec::new(),
            recorded: Totals::default(),
            now: 0,
            next_tick: 0,
        };
        p.step();
        p
    }

    fn now(&self) -> Now {
        Now { monotonic_ms: self.now, wall_ms: WALL0_S * 1_000 + self.now }
    }

    fn allow(&mut self, vm: usize, id: &str, n: u64) {
        for _ in 0..n {
            self.vms[vm].tally.record(Outcome::Allowed { key_id: Some(id) });
        }
        self.recorded.keys.entry(id.to_string()).or_default().0 += n;
    }

    fn deny_unknown(&mut self, vm: usize, n: u64) {
        for _ in 0..n {
            self.vms[vm].tally.record(Outcome::Denied { kind: DenyKind::InvalidKey, key_id: None });
        }
        self.recorded.unattributed.add(DenyKind::InvalidKey, n);
    }

    /// The answers due go to every live VM (one of them claims each), then a tick when one is due.
    fn step(&mut self) {
        self.receiver.set_clock(self.now);
        let now = self.now();
        for (token, status) in self.receiver.take_due(self.now) {
            let mut claimed = 0;
            for (i, vm) in self.vms.iter_mut().enumerate().filter(|(_, vm)| !vm.gone) {
                let events = &mut self.events;
                claimed += usize::from(vm.worker.on_answer(token, &Status(status), now, &mut |e| events.push((i, e))));
            }
            assert!(claimed <= 1, "answer {token} claimed by {claimed} VMs");
        }
        if self.now >= self.next_tick {
            self.next_tick = self.now + 1_000;
            for i in 0..self.vms.len() {
                let vm = &mut self.vms[i];
                if vm.stalled || vm.gone {
                    continue;
                }
                let events = &mut self.events;
                vm.worker.on_tick(&mut vm.tally, &self.store, &self.receiver, now, &mut |e| events.push((i, e)));
            }
        }
        self.now += STEP_MS;
    }

    fn run_ms(&mut self, ms: i64) {
        let end = self.now + ms;
        while self.now < end {
            self.step();
        }
    }

    fn go_away(&mut self, vm: usize) {
        let (store, events) = (&self.store, &mut self.events);
        let v = &mut self.vms[vm];
        v.worker.on_done(&mut v.tally, store, &mut |e| events.push((vm, e)));
        v.gone = true;
    }

    /// Which VMs report now.
    fn reporting(&self) -> Vec<usize> {
        (0..self.vms.len()).filter(|&i| !self.vms[i].gone && self.vms[i].worker.stats().is_some()).collect()
    }

    /// The reports the receiver took, each batch once.
    fn taken(&self) -> Vec<Report> {
        let mut seen = HashSet::new();
        let posts = self.receiver.posts.borrow();
        posts
            .iter()
            .filter(|p| p.answered.is_some_and(|s| (200..300).contains(&s)))
            .map(|p| p.report())
            .filter(|r| seen.insert(r.batch_id.clone()))
            .collect()
    }

    fn received(&self) -> Totals {
        let mut totals = Totals::default();
        for report in self.taken() {
            for (id, usage) in &report.keys {
                let entry = totals.keys.entry(id.clone()).or_default();
                entry.0 += usage.allowed;
                entry.1.merge(&usage.denied);
            }
            totals.unattributed.merge(&report.unattributed);
            totals.dropped += report.dropped;
        }
        totals
    }

    fn abandoned(&self) -> Vec<(usize, u64, String)> {
        self.events
            .iter()
            .filter_map(|(vm, e)| match e {
                Event::Abandoned { requests, why } => Some((*vm, *requests, why.clone())),
                _ => None,
            })
            .collect()
    }
}

#[test]
fn one_vm_of_four_reports_once_per_interval_with_every_vms_counts() {
    let mut p = Process::new(4);
    for round in 0..3 {
        for vm in 0..4 {
            p.allow(vm, "shared", 2);
            p.allow(vm, &format!("own{vm}"), 1);
            p.deny_unknown(vm, 1);
        }
        p.run_ms(10_000);
        assert_eq!(p.reporting().len(), 1, "round {round}");
    }
    p.run_ms(10_000);
    let posts = p.receiver.posts.borrow().clone();
    // The first VM to tick creates the lease, the next one takes it at once (at 0 s); the first
    // report is due an interval later.
    let times: Vec<i64> = posts.iter().map(|post| post.at).collect();
    assert_eq!(times, [10_000, 20_000, 30_000]);
    assert_eq!(p.received(), p.recorded);
    let reporter = p.reporting()[0];
    let ids: Vec<String> = p.taken().into_iter().map(|r| r.batch_id).collect();
    // Created with the lease, numbered as its VM.
    let prefix = format!("node-1/{}-{}/", WALL0_S * 1_000, p.vms[reporter].worker.me());
    assert_eq!(ids, [1, 2, 3].map(|n| format!("{prefix}{n}")));
    assert!(p.events.iter().all(|(vm, e)| *vm == reporter && matches!(e, Event::Sent { .. })), "{:?}", p.events);
}

#[test]
fn a_reporter_going_away_hands_its_counts_to_the_next_one_which_takes_the_lease_at_once() {
    let mut p = Process::new(3);
    p.run_ms(2_000);
    let first = p.reporting()[0];
    p.allow(0, "a", 5);
    p.allow(first, "b", 2);
    p.run_ms(3_000);
    // Counts gathered by the reporter, not in a report yet; its own tally, not even gathered.
    p.allow(first, "c", 1);
    p.go_away(first);
    assert!(p.abandoned().is_empty(), "nothing was being sent: {:?}", p.abandoned());
    p.run_ms(1_000);
    let second = p.reporting();
    assert_eq!(second.len(), 1);
    assert_ne!(second[0], first);
    p.run_ms(12_000);
    assert_eq!(p.received(), p.recorded, "every count arrives through the next reporter");
    let taken = p.taken();
    assert_eq!(taken.len(), 1);
    let reporter = taken[0].batch_id.split('/').nth(1).unwrap().split('-').nth(1).unwrap().to_string();
    assert_eq!(reporter, p.vms[second[0]].worker.me().to_string());
}

#[test]
fn a_reporter_that_stalls_past_its_lease_abandons_the_report_in_flight_and_hands_back_the_rest() {
    let mut p = Process::new(2);
    p.run_ms(2_000);
    let first = p.reporting()[0];
    let other = 1 - first;
    p.allow(other, "early", 4);
    p.receiver.fault.replace(Some(Fault::Lost));
    p.run_ms(10_000);
    assert_eq!(p.receiver.posts.borrow().len(), 1, "the report is in flight, its answer lost");
    p.allow(other, "late", 3);
    p.run_ms(1_000);
    p.vms[first].stalled = true;
    p.run_ms(4_000);
    assert_eq!(p.reporting().len(), 2, "the other VM took the lease; the stalled one does not know yet");
    p.receiver.fault.replace(None);
    p.vms[first].stalled = false;
    p.run_ms(1_000);
    assert_eq!(p.reporting(), [other]);
    let abandoned = p.abandoned();
    assert_eq!(abandoned.len(), 1, "{abandoned:?}");
    assert_eq!((abandoned[0].0, abandoned[0].1), (first, 4));
    assert!(
        abandoned[0].2.starts_with("the reporting lease moved to another VM while report node-1/"),
        "{abandoned:?}"
    );
    assert_eq!(
        Event::Abandoned { requests: 4, why: abandoned[0].2.clone() }.to_string(),
        format!("usage: 4 requests counted as dropped: {}", abandoned[0].2)
    );
    p.run_ms(12_000);
    let received = p.received();
    assert_eq!(received.keys.keys().collect::<Vec<_>>(), ["late"], "the abandoned report is not sent again");
    assert_eq!(received.keys["late"].0, 3);
}

#[test]
fn a_store_that_refuses_writes_loses_no_count_and_says_why() {
    let mut p = Process::new(3);
    p.run_ms(2_000);
    p.allow(0, "a", 1);
    p.allow(1, "b", 2);
    p.allow(2, "c", 3);
    p.store.fail_writes_after(Some(0));
    p.run_ms(5_000);
    let troubles: Vec<String> =
        p.events.iter().filter(|(_, e)| matches!(e, Event::Trouble(_))).map(|(_, e)| e.to_string()).collect();
    assert!(!troubles.is_empty());
    assert!(troubles.iter().all(|t| t.starts_with("usage: ")), "{troubles:?}");
    assert!(troubles.iter().any(|t| t.contains("cannot write keygate/usage/")), "{troubles:?}");
    p.store.fail_writes_after(None);
    p.run_ms(15_000);
    assert_eq!(p.received(), p.recorded);
    assert!(p.abandoned().is_empty());
}
