//! The native host of usage reporting against a fake Envoy: the workers' shards merged into one
//! report per process, answers routed to the configuration whose callout sent the POST, and the
//! counts of settings that went away handed to the next. The clocks are the tests' own; the
//! reporter's schedule is the core's (tested there). tests/usage.rs runs the same in Envoy.

use super::*;
use crate::fake_host::FakeConfig;
use keygate_core::reply::DenyKind;
use keygate_core::usage::{RawUsage, Report};
use std::cell::RefCell;

/// Envoy's callouts of one configuration: ids from 1, each POST kept.
#[derive(Default)]
struct FakeCallouts {
    next: RefCell<u32>,
    posted: RefCell<Vec<(u32, Vec<u8>)>>,
}

impl Post for FakeCallouts {
    fn post(&self, _cluster: &str, _headers: &[(&str, &str)], body: &[u8], _timeout_ms: u64) -> Result<u32, String> {
        let mut next = self.next.borrow_mut();
        *next += 1;
        self.posted.borrow_mut().push((*next, body.to_vec()));
        Ok(*next)
    }
}

impl FakeCallouts {
    fn reports(&self) -> Vec<Report> {
        self.posted.borrow().iter().map(|(_, body)| Report::parse(body).unwrap()).collect()
    }
    fn last_id(&self) -> u64 {
        u64::from(self.posted.borrow().last().unwrap().0)
    }
}

struct Status(u16);

impl Answer for Status {
    fn status(&self) -> u16 {
        self.0
    }
    fn etag(&self) -> Option<String> {
        None
    }
    fn body(&self) -> Vec<u8> {
        Vec::new()
    }
}

/// Settings of a receiver no other test uses (the registry is the process's).
fn settings(cluster: &str, flush_interval_ms: u64) -> UsageConfig {
    let raw: RawUsage = serde_json::from_value(serde_json::json!({
        "cluster": cluster, "authority": "usage.internal", "path": "/usage",
        "flush_interval_ms": flush_interval_ms, "timeout_ms": 500,
    }))
    .unwrap();
    UsageConfig::compile(&raw).unwrap()
}

const NOW_S: i64 = 1_800_000_000;

#[test]
fn counts_from_every_worker_thread_go_into_one_report() {
    let mut host = FakeConfig::default();
    let usage = Arc::new(Usage::new(&settings("usage-threads", 1_000), &mut host).unwrap());
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let usage = Arc::clone(&usage);
            std::thread::spawn(move || {
                for _ in 0..250 {
                    usage.record(Outcome::Allowed { key_id: Some("k_1") });
                }
                usage.record(Outcome::Denied { kind: DenyKind::MissingKey, key_id: None });
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    usage.record(Outcome::Denied { kind: DenyKind::RevokedKey, key_id: Some("k_2") });
    let callouts = FakeCallouts::default();
    usage.on_tick_at(0, NOW_S, &callouts, &mut host);
    assert!(callouts.posted.borrow().is_empty(), "nothing before the flush interval");
    usage.on_tick_at(1_000, NOW_S + 1, &callouts, &mut host);
    let reports = callouts.reports();
    assert_eq!(reports.len(), 1, "one POST for the process");
    let report = &reports[0];
    assert_eq!(report.keys["k_1"].allowed, 1_000);
    assert_eq!(report.keys["k_2"].denied.get(DenyKind::RevokedKey), 1);
    assert_eq!(report.unattributed.get(DenyKind::MissingKey), 4);
    assert_eq!(report.node, "", "the ABI gives a configuration no node id");
    assert_eq!(host.gauge("keygate.usage.keys_pending").unwrap(), 2, "both keys wait for the receiver");
    assert!(usage.on_answer_at(1_010, callouts.last_id(), &Status(204), &mut host));
    assert_eq!(host.counter("keygate.usage.reports_sent").unwrap(), 1);
    assert_eq!(host.gauge("keygate.usage.keys_pending").unwrap(), 0);
}

#[test]
fn two_configurations_of_the_same_settings_send_one_report_and_take_only_their_own_answers() {
    let config = settings("usage-shared", 1_000);
    let (mut first_host, mut second_host) = (FakeConfig::default(), FakeConfig::default());
    let first = Usage::new(&config, &mut first_host).unwrap();
    let second = Usage::new(&config, &mut second_host).unwrap();
    first.record(Outcome::Allowed { key_id: Some("k_1") });
    second.record(Outcome::Allowed { key_id: Some("k_1") });
    let (first_callouts, second_callouts) = (FakeCallouts::default(), FakeCallouts::default());
    first.on_tick_at(0, NOW_S, &first_callouts, &mut first_host);
    second.on_tick_at(10, NOW_S, &second_callouts, &mut second_host);
    first.on_tick_at(1_000, NOW_S + 1, &first_callouts, &mut first_host);
    second.on_tick_at(1_010, NOW_S + 1, &second_callouts, &mut second_host);
    assert_eq!(first_callouts.reports().len(), 1);
    assert!(second_callouts.posted.borrow().is_empty(), "one report per process, not per configuration");
    assert_eq!(first_callouts.reports()[0].keys["k_1"].allowed, 2, "both configurations' counts");
    // The second configuration's own callout 1 (a key-set fetch, say) is not the report's.
    assert!(!second.on_answer_at(1_020, first_callouts.last_id(), &Status(200), &mut second_host));
    assert!(first.on_answer_at(1_030, first_callouts.last_id(), &Status(200), &mut first_host));
    assert!(!first.on_answer_at(1_040, first_callouts.last_id(), &Status(200), &mut first_host), "answered once");
}

#[test]
fn a_post_whose_configuration_went_away_is_sent_again_by_the_next_under_the_same_batch_id() {
    let config = settings("usage-handover", 1_000);
    let mut host = FakeConfig::default();
    let old = Usage::new(&config, &mut host).unwrap();
    let new = Usage::new(&config, &mut host).unwrap();
    old.record(Outcome::Allowed { key_id: Some("k_1") });
    let (old_callouts, new_callouts) = (FakeCallouts::default(), FakeCallouts::default());
    old.on_tick_at(0, NOW_S, &old_callouts, &mut host);
    old.on_tick_at(1_000, NOW_S + 1, &old_callouts, &mut host);
    drop(old); // its callout's answer never comes
    new.record(Outcome::Allowed { key_id: Some("k_1") });
    new.on_tick_at(3_000, NOW_S + 3, &new_callouts, &mut host); // past timeout_ms and the slack: failed
    new.on_tick_at(4_100, NOW_S + 4, &new_callouts, &mut host); // the retry, a second later
    let (sent, resent) = (old_callouts.reports(), new_callouts.reports());
    assert_eq!(resent.len(), 1);
    assert_eq!(resent[0], sent[0], "the same body under the same batch_id");
    assert_eq!(host.counter("keygate.usage.failures").unwrap(), 1);
    assert!(new.on_answer_at(4_200, new_callouts.last_id(), &Status(200), &mut host));
    new.on_tick_at(5_000, NOW_S + 5, &new_callouts, &mut host);
    assert_eq!(new_callouts.reports()[1].keys["k_1"].allowed, 1, "the count after it in the next report");
}

#[test]
fn counts_of_settings_that_went_away_go_to_the_next_settings_of_the_same_receiver() {
    let mut host = FakeConfig::default();
    let old = Usage::new(&settings("usage-changed", 1_000), &mut host).unwrap();
    let new = Usage::new(&settings("usage-changed", 2_000), &mut host).unwrap();
    old.record(Outcome::Allowed { key_id: Some("k_1") });
    old.record(Outcome::Denied { kind: DenyKind::InvalidKey, key_id: None });
    drop(old);
    let callouts = FakeCallouts::default();
    new.on_tick_at(0, NOW_S, &callouts, &mut host);
    new.on_tick_at(2_000, NOW_S + 2, &callouts, &mut host);
    let reports = callouts.reports();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].keys["k_1"].allowed, 1);
    assert_eq!(reports[0].unattributed.get(DenyKind::InvalidKey), 1);
}

#[test]
fn a_configuration_ticks_as_often_as_the_shorter_of_its_sync_and_its_reporter_want() {
    let mut host = FakeConfig::default();
    let usage = Usage::new(&settings("usage-tick", 10_000), &mut host).unwrap();
    assert_eq!(usage.tick(), std::time::Duration::from_millis(1_000), "a tenth of the flush interval, at most 1 s");
}
