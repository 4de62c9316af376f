//! Usage reporting against the fake host ([`super::fake`]), in simulated time: one report per
//! interval with every worker's counts, the receiver down, failing, slow, silent or answering
//! garbage and then recovering, a report refused for good, the backoff, the bound, the stats and
//! the log lines.
//!
//! Settings unless a test says otherwise: a 10 s flush interval (so a 1 s tick), a 2 s timeout (so a
//! POST unanswered for 3 s is given up on), 10 000 pending keys, and a backoff of 1, 2, 4, 8, then
//! 10 s.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::fake::*;
use crate::live::host::Answer;
use crate::reply::DenyKind;
use crate::usage::report::{batch_id, MAX_BATCH_ID_BYTES, MAX_NODE_BYTES};
use crate::usage::reporter::{refused_for_good, Event, Post, Reporter, Stats};
use crate::usage::tally::Outcome;
use serde_json::json;

/// Every worker counts traffic of its own and some of the others'.
fn traffic(e: &mut Envoy) {
    for w in 0..e.workers.len() {
        e.allow(w, "shared", 3);
        e.allow(w, &format!("own{w}"), w + 1);
        e.deny(w, DenyKind::InsufficientScope, Some("shared"), 1);
        e.deny(w, DenyKind::MissingKey, None, 2);
        e.deny(w, DenyKind::InvalidKey, None, w);
        e.deny(w, DenyKind::RevokedKey, Some("old"), 1);
    }
}

fn failures(e: &Envoy) -> Vec<(String, String, u64)> {
    e.events
        .iter()
        .filter_map(|ev| match ev {
            Event::Failed { batch_id, reason, retry_in_ms } => Some((batch_id.clone(), reason.clone(), *retry_in_ms)),
            _ => None,
        })
        .collect()
}

fn batch_ids(e: &Envoy) -> Vec<String> {
    e.posts().iter().map(|p| p.report().batch_id).collect()
}

// ---------------------------------------------------------------------------------------------
// One report per interval

#[test]
fn four_workers_counts_arrive_merged_in_one_report() {
    for shared in [false, true] {
        let mut e = if shared { Envoy::shared(4, json!({})) } else { Envoy::new(4, json!({})) };
        e.run_ms(2_000);
        traffic(&mut e);
        e.run_ms(9_000);
        let posts = e.posts();
        assert_eq!(posts.len(), 1, "shared: {shared}");
        let report = posts[0].report();
        assert_eq!(e.received(), e.recorded, "shared: {shared}");
        assert_eq!(report.keys["shared"].allowed, 12);
        assert_eq!(report.keys["shared"].denied.get(DenyKind::InsufficientScope), 4);
        assert_eq!(report.keys["own3"].allowed, 4);
        assert_eq!(report.keys["old"].denied.get(DenyKind::RevokedKey), 4);
        assert_eq!(report.keys.len(), 6);
        assert_eq!(report.unattributed.get(DenyKind::MissingKey), 8);
        assert_eq!(report.unattributed.get(DenyKind::InvalidKey), 6);
        assert_eq!(report.dropped, 0);
        // Recorded after the tick at 2 s set the workers' coarse clocks.
        assert_eq!(report.keys["shared"].last_used_s, WALL0_S + 2);
        assert_eq!((report.node.as_str(), report.batch_id.as_str()), (NODE, "node-1/1796306399750-2/1"));
        assert_eq!((report.from_s, report.to_s), (WALL0_S, WALL0_S + 10));
        assert_eq!(e.log(), ["usage report node-1/1796306399750-2/1 sent, 6 keys"]);
    }
}

#[test]
fn exactly_one_post_per_flush_interval() {
    let mut e = Envoy::new(2, json!({}));
    for _ in 0..6 {
        e.allow(0, "a", 1);
        e.allow(1, "b", 2);
        e.run_ms(10_000);
    }
    let posts = e.posts();
    let times: Vec<i64> = posts.iter().map(|p| p.at).collect();
    assert_eq!(times, [10_000, 20_000, 30_000, 40_000, 50_000, 60_000]);
    assert_eq!(batch_ids(&e), (1..=6).map(|n| format!("node-1/1796306399750-2/{n}")).collect::<Vec<_>>());
    assert_eq!(e.received(), e.recorded);
    // The intervals follow each other with no gap and no overlap.
    let reports = e.taken();
    for pair in reports.windows(2) {
        assert_eq!(pair[0].to_s, pair[1].from_s);
    }
    assert_eq!(reports[0].from_s, WALL0_S);
    assert_eq!(e.reporter.stats(), Stats { reports_sent: 6, failures: 0, dropped: 0, keys_pending: 0 });
}

#[test]
fn the_post_carries_the_configured_destination_and_a_json_body() {
    let mut e = Envoy::new(1, json!({"timeout_ms": 750}));
    e.allow(0, "k", 1);
    e.run_ms(10_000);
    let post = &e.posts()[0];
    assert_eq!(post.cluster, "usage");
    assert_eq!(post.timeout_ms, 750);
    let headers: Vec<(&str, &str)> = post.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    assert_eq!(
        headers,
        [
            (":method", "POST"),
            (":path", "/v1/usage"),
            (":authority", "usage.internal"),
            ("content-type", "application/json")
        ]
    );
    assert_eq!(
        String::from_utf8(post.body.clone()).unwrap(),
        r#"{"batch_id":"node-1/1796306399750-2/1","node":"node-1","from":"2026-12-03T14:00:00Z","to":"2026-12-03T14:00:10Z","keys":{"k":{"allowed":1,"denied":{},"last_used":"2026-12-03T14:00:00Z"}},"unattributed":{},"dropped":0}"#
    );
}

#[test]
fn a_quiet_interval_sends_nothing_and_the_next_report_covers_it() {
    let mut e = Envoy::new(1, json!({}));
    e.run_ms(35_000);
    assert!(e.posts().is_empty());
    e.allow(0, "late", 1);
    e.run_ms(5_000);
    let reports = e.taken();
    assert_eq!(reports.len(), 1);
    assert_eq!((reports[0].from_s, reports[0].to_s), (WALL0_S, WALL0_S + 40));
    assert_eq!(reports[0].batch_id, "node-1/1796306399750-2/1", "a skipped interval takes no number");
    assert_eq!(reports[0].keys["late"].last_used_s, WALL0_S + 35);
}

#[test]
fn public_routes_are_not_counted_and_made_up_keys_create_no_entry() {
    let mut e = Envoy::new(1, json!({}));
    e.record(0, Outcome::Allowed { key_id: None });
    e.run_ms(10_000);
    assert!(e.posts().is_empty(), "an allowed request with no key is not usage of any key");
    // An id a decision never attaches to these kinds, had a host passed one, is still no entry.
    e.deny(0, DenyKind::InvalidKey, Some("made-up"), 3);
    e.deny(0, DenyKind::MissingKey, Some("made-up"), 1);
    e.deny(0, DenyKind::KeySetUnavailable, Some("made-up"), 1);
    e.deny(0, DenyKind::Forbidden, None, 2);
    e.run_ms(10_000);
    let report = &e.taken()[0];
    assert!(report.keys.is_empty(), "{report:?}");
    let got: Vec<(DenyKind, u64)> = report.unattributed.iter().collect();
    assert_eq!(
        got,
        [
            (DenyKind::MissingKey, 1),
            (DenyKind::InvalidKey, 3),
            (DenyKind::Forbidden, 2),
            (DenyKind::KeySetUnavailable, 1)
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// A receiver that fails, then recovers

/// Traffic in every interval while the receiver misbehaves with `fault` for 40 s, then recovers:
/// every count arrives, each report under one batch id on every attempt.
fn recovers_from(fault: Fault) -> Envoy {
    let mut e = Envoy::new(4, json!({}));
    e.fault(Some(fault.clone()));
    for second in 0..40 {
        e.allow(second % 4, &format!("k{}", second % 7), 1);
        e.deny(second % 4, DenyKind::ExpiredKey, Some("exp"), 1);
        e.deny(0, DenyKind::InvalidKey, None, 1);
        e.run_ms(1_000);
    }
    assert!(e.taken().is_empty(), "{fault:?}: a report was taken while the receiver failed");
    let tries = failures(&e).len();
    assert!(tries >= 4, "{fault:?}: {tries} tries in 30 s");
    assert!(failures(&e).iter().all(|(id, _, _)| *id == "node-1/1796306399750-2/1"), "{fault:?}");
    let posts = e.posts();
    assert!(posts.iter().all(|p| p.body == posts[0].body), "{fault:?}: a retry changed the report");
    e.fault(None);
    let took = e.run_until_delivered(40_000).unwrap_or_else(|| panic!("{fault:?}: never delivered"));
    assert!(took <= 10_000 + 2 * 1_000 + STEP_MS, "{fault:?}: delivered {took} ms after recovery");
    assert_eq!(e.received(), e.recorded, "{fault:?}");
    let taken = e.taken();
    assert_eq!(taken.len(), 2, "{fault:?}: the first report, then one with what came while it was retried");
    assert_eq!(taken[0].batch_id, "node-1/1796306399750-2/1");
    assert_eq!(taken[1].batch_id, "node-1/1796306399750-2/2");
    assert_eq!((taken[0].from_s, taken[0].to_s), (WALL0_S, WALL0_S + 10));
    assert_eq!(taken[1].from_s, WALL0_S + 10);
    assert_eq!(taken[0].keys["exp"].denied.get(DenyKind::ExpiredKey), 10);
    assert_eq!(taken[1].keys["exp"].denied.get(DenyKind::ExpiredKey), 30);
    e
}

#[test]
fn a_receiver_down_gets_the_same_report_until_it_recovers() {
    let e = recovers_from(Fault::Down);
    assert_eq!(failures(&e)[0].1, "no answer (down, refused or timed out)");
}

#[test]
fn a_5xx_is_retried_with_the_same_batch_id_and_body() {
    let e = recovers_from(Fault::Status(503));
    assert_eq!(failures(&e)[0].1, "HTTP status 503");
    assert_eq!(e.reporter.stats().failures, failures(&e).len() as u64);
}

#[test]
fn a_slow_receiver_times_out_and_is_retried() {
    let e = recovers_from(Fault::Slow(5_000));
    let posts = e.posts();
    // The host times the POST out at timeout_ms.
    assert_eq!(posts[0].answered, Some(0));
    assert_eq!(failures(&e)[0].1, "no answer (down, refused or timed out)");
}

#[test]
fn an_answer_never_delivered_is_given_up_on_after_the_timeout_and_a_second() {
    let e = recovers_from(Fault::Lost);
    let posts = e.posts();
    assert_eq!(failures(&e)[0], ("node-1/1796306399750-2/1".into(), "no answer within 2000 ms".into(), 1_000));
    // Posted at 10 s; given up on at the first tick past 3 s later; resent 1 s after that.
    assert_eq!((posts[0].at, posts[1].at), (10_000, 15_000));
}

#[test]
fn a_garbage_answer_fails_and_is_retried() {
    let e = recovers_from(Fault::Garbage);
    assert_eq!(failures(&e)[0].1, "no answer (down, refused or timed out)");
}

#[test]
fn a_redirect_a_timeout_or_too_many_requests_is_retried_and_any_other_client_error_is_final() {
    for status in [100, 204, 301, 400, 401, 403, 404, 408, 409, 413, 422, 429, 451, 499, 500, 599] {
        let mut e = Envoy::new(1, json!({}));
        e.fault(Some(Fault::Status(status)));
        e.allow(0, "k", 1);
        e.run_ms(10_000);
        let (ok, dropped) = ((200..300).contains(&status), refused_for_good(status));
        assert_eq!(dropped, (400..500).contains(&status) && status != 408 && status != 429, "{status}");
        assert_eq!(e.taken().len(), usize::from(ok), "{status}");
        assert_eq!(failures(&e).len(), usize::from(!ok && !dropped), "{status}");
        assert_eq!(e.reporter.sending().is_some(), !ok && !dropped, "{status}");
        assert_eq!(e.reporter.stats().dropped, u64::from(dropped), "{status}");
    }
}

#[test]
fn a_report_refused_for_good_is_dropped_counted_and_logged_and_reporting_moves_on() {
    let mut e = Envoy::new(2, json!({}));
    e.fault(Some(Fault::Status(400)));
    e.allow(0, "a", 3);
    e.allow(1, "b", 1);
    e.deny(1, DenyKind::MissingKey, None, 2);
    e.run_ms(10_000);
    assert_eq!(e.posts().len(), 1);
    assert_eq!(e.reporter.sending(), None, "nothing is retried");
    assert_eq!(e.events, [Event::Refused { batch_id: "node-1/1796306399750-2/1".into(), status: 400, requests: 6 }]);
    assert_eq!(
        e.log(),
        ["usage report node-1/1796306399750-2/1 refused by the receiver (HTTP status 400): not sent again, \
          its 6 requests counted as dropped"]
    );
    assert_eq!(e.reporter.stats(), Stats { reports_sent: 0, failures: 0, dropped: 6, keys_pending: 0 });
    // Nothing more goes until the next interval, which brings the next report, numbered on.
    e.fault(None);
    e.allow(0, "a", 1);
    e.run_ms(9_990);
    assert_eq!(e.posts().len(), 1);
    e.run_ms(10);
    let taken = e.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].batch_id, "node-1/1796306399750-2/2");
    assert_eq!((taken[0].from_s, taken[0].to_s), (WALL0_S + 10, WALL0_S + 20));
    assert_eq!(taken[0].keys["a"].allowed, 1);
    assert_eq!(e.reporter.stats(), Stats { reports_sent: 1, failures: 0, dropped: 6, keys_pending: 0 });
}

#[test]
fn a_report_refused_for_good_after_retries_releases_the_counts_waiting_behind_it() {
    // 503 while the report waits, then the receiver says 413 (too large, say): the report is
    // dropped, and what was counted meanwhile goes out at once, the interval being long past.
    let mut e = Envoy::new(1, json!({}));
    e.fault(Some(Fault::Status(503)));
    e.allow(0, "first", 2);
    e.run_ms(10_000);
    e.allow(0, "second", 1);
    e.run_ms(14_000);
    assert_eq!(failures(&e).len(), 4);
    e.fault(Some(Fault::Status(413)));
    e.run_ms(1_000);
    assert!(matches!(&e.events[..], [.., Event::Refused { status: 413, requests: 2, .. }]), "{:?}", e.events);
    e.fault(None);
    assert_eq!(e.run_until_delivered(2_000), Some(1_000), "at the next tick, not an interval later");
    let taken = e.taken();
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].batch_id, "node-1/1796306399750-2/2");
    assert_eq!(taken[0].keys.keys().collect::<Vec<_>>(), ["second"]);
    let stats = e.reporter.stats();
    assert_eq!((stats.reports_sent, stats.failures, stats.dropped), (1, 4, 2));
}

#[test]
fn a_call_the_host_refuses_is_retried() {
    let e = recovers_from(Fault::Refuse);
    assert_eq!(failures(&e)[0].1, "cannot call cluster \"usage\": BadArgument");
    assert!(e.posts().len() >= 2);
}

#[test]
fn retries_back_off_doubling_from_one_second_up_to_the_flush_interval() {
    let mut e = Envoy::new(1, json!({}));
    e.fault(Some(Fault::Status(500)));
    e.allow(0, "k", 1);
    e.run_ms(70_000);
    let times: Vec<i64> = e.posts().iter().map(|p| p.at).collect();
    // Ticks are 1 s apart, so a retry goes out on the first tick its wait has passed.
    assert_eq!(times, [10_000, 11_000, 13_000, 17_000, 25_000, 35_000, 45_000, 55_000, 65_000]);
    let waits: Vec<u64> = failures(&e).iter().map(|f| f.2).collect();
    assert_eq!(waits, [1_000, 2_000, 4_000, 8_000, 10_000, 10_000, 10_000, 10_000, 10_000]);
    assert_eq!(e.log()[0], "usage report node-1/1796306399750-2/1 not sent: HTTP status 500; retrying in 1000 ms");
    // A later report starts its backoff afresh.
    e.fault(None);
    e.run_ms(10_000);
    e.fault(Some(Fault::Status(500)));
    e.allow(0, "k", 1);
    e.run_ms(20_000);
    let late: Vec<u64> = failures(&e).iter().skip(9).map(|f| f.2).collect();
    assert_eq!(late[..3], [1_000, 2_000, 4_000]);
}

#[test]
fn counts_arriving_while_a_report_is_pending_go_in_the_next_report() {
    let mut e = Envoy::new(2, json!({}));
    e.fault(Some(Fault::Lost));
    e.allow(0, "first", 1);
    e.run_ms(10_000);
    assert_eq!(e.reporter.sending(), Some("node-1/1796306399750-2/1"));
    e.allow(1, "second", 2);
    e.allow(0, "first", 1);
    e.run_ms(1_000);
    assert_eq!(e.reporter.stats().keys_pending, 3, "one key in the report sent, two in the next");
    e.fault(None);
    e.run_until_delivered(30_000).unwrap();
    let taken = e.taken();
    assert_eq!(taken.len(), 2);
    assert_eq!(taken[0].keys.keys().collect::<Vec<_>>(), ["first"]);
    assert_eq!(taken[0].keys["first"].allowed, 1);
    assert_eq!(taken[1].keys["first"].allowed, 1);
    assert_eq!(taken[1].keys["second"].allowed, 2);
    assert_eq!(e.received(), e.recorded);
}

#[test]
fn an_answer_to_a_post_given_up_on_is_not_taken_for_the_retry() {
    let config = config(&json!({}));
    let mut reporter = Reporter::new(config.clone(), NODE, EPOCH_MS, REPORTER);
    let receiver = Receiver::default();
    let mut events = Vec::new();
    let mut tally = config.tally(WALL0_S);
    tally.record(Outcome::Allowed { key_id: Some("k") });
    reporter.on_tick(0, WALL0_S, tally, &receiver, &mut |e| events.push(e));
    reporter.on_tick(10_000, WALL0_S + 10, config.tally(0), &receiver, &mut |e| events.push(e));
    assert_eq!(receiver.posts.borrow().len(), 1);
    // Silent past 3 s: given up on; resent a second later under token 2.
    reporter.on_tick(13_001, WALL0_S + 13, config.tally(0), &receiver, &mut |e| events.push(e));
    reporter.on_tick(14_001, WALL0_S + 14, config.tally(0), &receiver, &mut |e| events.push(e));
    assert_eq!(receiver.posts.borrow().len(), 2);
    assert!(!reporter.on_answer(14_100, 1, &Status(200), &mut |e| events.push(e)), "token 1 was given up on");
    assert!(!reporter.on_answer(14_100, 77, &Status(200), &mut |e| events.push(e)), "no such token");
    assert_eq!(reporter.sending(), Some("node-1/1796306399750-2/1"));
    assert!(reporter.on_answer(14_200, 2, &Status(202), &mut |e| events.push(e)));
    assert_eq!(reporter.sending(), None);
    assert_eq!(reporter.stats(), Stats { reports_sent: 1, failures: 1, dropped: 0, keys_pending: 0 });
}

// ---------------------------------------------------------------------------------------------
// Bounds

#[test]
fn past_max_pending_keys_requests_are_counted_as_dropped_and_reported() {
    let mut e = Envoy::new(2, json!({"max_pending_keys": 3}));
    e.allow(0, "a", 1);
    e.allow(0, "b", 1);
    e.allow(0, "c", 1);
    e.allow(0, "d", 2); // past worker 0's bound
    e.allow(0, "a", 1); // a key already kept is still counted
    e.allow(1, "e", 4); // fits worker 1, not the merge
    e.deny(1, DenyKind::MissingKey, None, 5); // totals are never dropped
    e.run_ms(10_000);
    let report = &e.taken()[0];
    assert_eq!(report.keys.keys().collect::<Vec<_>>(), ["a", "b", "c"]);
    assert_eq!(report.keys["a"].allowed, 2);
    assert_eq!(report.dropped, 6);
    assert_eq!(report.unattributed.get(DenyKind::MissingKey), 5);
    assert_eq!(report.requests(), 2 + 1 + 1 + 6 + 5, "every request is in the report");
    assert_eq!(e.reporter.stats().dropped, 6);
    assert_eq!(e.log()[0], "usage: 6 requests counted under no key: usage.max_pending_keys keys are pending");
    assert!(matches!(e.events[0], Event::Dropped { requests: 6 }));
}

#[test]
fn while_the_receiver_is_down_memory_stays_within_two_tallies() {
    let mut e = Envoy::new(2, json!({"max_pending_keys": 50}));
    e.fault(Some(Fault::Down));
    let mut n = 0;
    for _ in 0..60 {
        for w in 0..2 {
            for _ in 0..20 {
                n += 1;
                e.allow(w, &format!("k{n}"), 1);
            }
        }
        e.run_ms(1_000);
        assert!(e.reporter.stats().keys_pending <= 100, "{:?}", e.reporter.stats());
    }
    e.fault(None);
    e.run_until_delivered(60_000).unwrap();
    let received = e.received();
    let kept: u64 = received.keys.values().map(|(allowed, _)| allowed).sum();
    assert_eq!(kept + received.dropped, n as u64, "each request is reported, under its key or as dropped");
    assert_eq!(received.dropped, e.reporter.stats().dropped);
}

// ---------------------------------------------------------------------------------------------
// Batch ids, stats and what the host sees

#[test]
fn batch_ids_differ_across_restarts_and_across_reporters_started_in_one_millisecond() {
    let config = config(&json!({}));
    let mut ids = std::collections::HashSet::new();
    // Restarts a millisecond and a minute apart; two reporters of one process (two VMs after a
    // reconfiguration, say) started in the same millisecond.
    let starts = [(EPOCH_MS, REPORTER), (EPOCH_MS + 1, REPORTER), (EPOCH_MS + 60_000, 0), (EPOCH_MS + 60_000, 1)];
    for (start, (epoch_ms, number)) in starts.into_iter().enumerate() {
        let mut reporter = Reporter::new(config.clone(), NODE, epoch_ms, number);
        let receiver = Receiver::default();
        reporter.on_tick(0, WALL0_S, config.tally(0), &receiver, &mut |_| {});
        for i in 1..=3 {
            let mut tally = config.tally(WALL0_S);
            tally.record(Outcome::Allowed { key_id: Some("k") });
            reporter.on_tick(i * 10_000, WALL0_S, tally, &receiver, &mut |_| {});
            let token = receiver.posts.borrow().len() as u32;
            assert!(reporter.on_answer(i * 10_000, token, &Status(200), &mut |_| {}));
        }
        for post in receiver.posts.borrow().iter() {
            assert!(ids.insert(post.report().batch_id), "start {start}: a batch id seen before");
        }
    }
    assert_eq!(ids.len(), 12);
    assert!(ids.contains("node-1/1796306399751-2/2"), "{ids:?}");
    assert!(ids.contains("node-1/1796306459750-0/3") && ids.contains("node-1/1796306459750-1/3"), "{ids:?}");
}

#[test]
fn an_unknown_node_reports_as_empty_and_a_long_one_is_cut() {
    let config = config(&json!({}));
    let receiver = Receiver::default();
    // 201 bytes whose 200th is inside a two-byte character: cut before it.
    let wide = format!("n{}", "é".repeat(MAX_NODE_BYTES / 2));
    let cut = format!("n{}", "é".repeat(MAX_NODE_BYTES / 2 - 1));
    for (node, want) in [("", String::new()), (&*"n".repeat(5_000), "n".repeat(MAX_NODE_BYTES)), (&*wide, cut)] {
        let mut reporter = Reporter::new(config.clone(), node, 5, 0);
        let mut tally = config.tally(WALL0_S);
        tally.record(Outcome::Allowed { key_id: Some("k") });
        reporter.on_tick(0, WALL0_S, tally, &receiver, &mut |_| {});
        reporter.on_tick(10_000, WALL0_S, config.tally(0), &receiver, &mut |_| {});
        let report = receiver.posts.borrow().last().unwrap().report();
        assert_eq!(report.node, want);
        assert_eq!(report.batch_id, format!("{want}/5-0/1"));
    }
    // The longest id there can be still reads back.
    let longest = batch_id(&"n".repeat(MAX_NODE_BYTES), i64::MIN, u32::MAX, u64::MAX);
    assert!(longest.len() <= MAX_BATCH_ID_BYTES, "{}", longest.len());
}

#[test]
fn a_wall_clock_stepping_back_never_makes_an_interval_end_before_it_starts() {
    let config = config(&json!({}));
    let receiver = Receiver::default();
    let mut reporter = Reporter::new(config.clone(), NODE, EPOCH_MS, REPORTER);
    let mut tally = config.tally(WALL0_S);
    tally.record(Outcome::Allowed { key_id: Some("k") });
    reporter.on_tick(0, WALL0_S, tally, &receiver, &mut |_| {});
    reporter.on_tick(10_000, WALL0_S - 3_600, config.tally(0), &receiver, &mut |_| {});
    let report = receiver.posts.borrow()[0].report();
    assert_eq!((report.from_s, report.to_s), (WALL0_S, WALL0_S));
}

#[test]
fn stats_count_sent_reports_failures_drops_and_pending_keys() {
    let mut e = Envoy::new(1, json!({"max_pending_keys": 2}));
    assert_eq!(e.reporter.stats(), Stats::default());
    e.allow(0, "a", 1);
    e.allow(0, "b", 1);
    e.allow(0, "c", 1);
    e.fault(Some(Fault::Status(502)));
    e.run_ms(10_000);
    assert_eq!(e.reporter.stats(), Stats { reports_sent: 0, failures: 1, dropped: 1, keys_pending: 2 });
    e.fault(None);
    e.run_ms(2_000);
    assert_eq!(e.reporter.stats(), Stats { reports_sent: 1, failures: 1, dropped: 1, keys_pending: 0 });
}

#[test]
fn the_reporter_reads_no_answer_body() {
    // `Status::body` panics: a 2xx with any body is taken without reading it.
    struct Junk;
    impl Answer for Junk {
        fn status(&self) -> u16 {
            200
        }
        fn etag(&self) -> Option<String> {
            Some("\"x\"".into())
        }
        fn body(&self) -> Vec<u8> {
            panic!("read")
        }
    }
    let config = config(&json!({}));
    let receiver = Receiver::default();
    let mut reporter = Reporter::new(config.clone(), NODE, EPOCH_MS, REPORTER);
    let mut tally = config.tally(WALL0_S);
    tally.record(Outcome::Denied { kind: DenyKind::Forbidden, key_id: Some("k") });
    reporter.on_tick(0, WALL0_S, tally, &receiver, &mut |_| {});
    reporter.on_tick(10_000, WALL0_S, config.tally(0), &receiver, &mut |_| {});
    assert!(reporter.on_answer(10_005, 1, &Junk, &mut |_| {}));
    assert_eq!(reporter.stats().reports_sent, 1);
}

#[test]
fn a_post_trait_object_is_all_a_host_implements() {
    // The hosts' adapters: one call each way. Here, a host that can only refuse.
    struct Nowhere;
    impl Post for Nowhere {
        fn post(&self, cluster: &str, _: &[(&str, &str)], _: &[u8], _: u64) -> Result<u32, String> {
            Err(format!("no cluster {cluster}"))
        }
    }
    let config = config(&json!({}));
    let mut reporter = Reporter::new(config.clone(), NODE, EPOCH_MS, REPORTER);
    let mut events = Vec::new();
    let mut tally = config.tally(WALL0_S);
    tally.record(Outcome::Allowed { key_id: Some("k") });
    reporter.on_tick(0, WALL0_S, tally, &Nowhere, &mut |e| events.push(e));
    reporter.on_tick(10_000, WALL0_S + 10, config.tally(0), &Nowhere, &mut |e| events.push(e));
    assert_eq!(
        events,
        [Event::Failed {
            batch_id: "node-1/1796306399750-2/1".into(),
            reason: "no cluster usage".into(),
            retry_in_ms: 1_000
        }]
    );
}
