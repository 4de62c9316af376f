//! The native host of the key-set sync against a fake Envoy: ticks and callout answers driven by
//! hand, one store per process shared by configurations, the ticker thread, and the answers Envoy
//! hands the hook. tests/native.rs runs the same in Envoy.

use super::*;
use crate::fake_host::FakeConfig;
use crate::filter::{configure, Filter, Log, Stream, Unreadable, Verdict};
use keygate_core::keys::hash_key;
use keygate_core::layout::{Layout, Record};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

const KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";

/// The key-set endpoint behind Envoy's callouts: what it serves, what was asked.
#[derive(Default)]
struct FakeFetch {
    next: RefCell<u32>,
    asked: RefCell<Vec<(u32, String)>>,
    refuse: RefCell<bool>,
}

impl Fetch for FakeFetch {
    fn get(&self, _cluster: &str, headers: &[(&str, &str)], _timeout_ms: u64) -> Result<u32, String> {
        if *self.refuse.borrow() {
            return Err("cannot call cluster \"keyset\": callout refused (2)".into());
        }
        let path = headers.iter().find(|(n, _)| *n == ":path").map(|(_, v)| v.to_string()).unwrap_or_default();
        let mut next = self.next.borrow_mut();
        *next += 1;
        self.asked.borrow_mut().push((*next, path));
        Ok(*next)
    }
}

/// A configuration of `KEY` in a live set only, at manifest `path` (a namespace per test).
fn live_filter(path: &str, host: &mut FakeConfig) -> Filter {
    let text = serde_json::json!({
        "credential": {"prefixes": ["sk_live_"]},
        "key_set": {"cluster": "keyset", "path": path, "poll_interval_ms": 500},
    });
    configure(b"keygate", text.to_string().as_bytes(), host).expect("a live key set configures")
}

fn layout(revoked: bool, version: &str) -> Layout {
    let hash = hex::encode(hash_key(KEY.as_bytes()));
    let json = serde_json::json!({"id": "0000aaaa", "hash": hash, "org": "org_1", "scopes": [], "revoked": revoked})
        .to_string();
    Layout::new(&[Record { hash: &hash, json: &json }], 0, version).unwrap()
}

/// Answers every callout asked so far from `layout` (or with `status` and no body).
fn answer_all(filter: &Filter, fetch: &FakeFetch, host: &mut FakeConfig, layout: &Layout, status: u16) {
    loop {
        let asked: Vec<(u32, String)> = fetch.asked.borrow_mut().drain(..).collect();
        if asked.is_empty() {
            return;
        }
        for (token, path) in asked {
            let body = if path.ends_with("manifest.json") {
                layout.manifest()
            } else {
                layout.shards.iter().find(|s| path.ends_with(&s.path)).map(|s| s.body.clone()).unwrap_or_default()
            };
            let code = status.to_string();
            let headers: Vec<(&[u8], &[u8])> = vec![(b":status", code.as_bytes())];
            let answer = CalloutAnswer::new(true, &headers, vec![&body[..body.len() / 2], &body[body.len() / 2..]]);
            filter.on_answer(u64::from(token), &answer, answer.body_size(), fetch, host);
        }
    }
}

/// Ticks twice (the first tick of a store creates the lease, the next claims it and polls), then
/// answers the sync.
fn sync(filter: &Filter, fetch: &FakeFetch, host: &mut FakeConfig, layout: &Layout, status: u16) {
    filter.on_tick(fetch, host);
    filter.on_tick(fetch, host);
    answer_all(filter, fetch, host, layout, status);
}

/// A stream that records the reply sent.
#[derive(Default)]
struct Request {
    sent: Option<u16>,
}

impl Log for Request {
    fn enabled(&self, _: Level) -> bool {
        false
    }
    fn log(&self, _: Level, _: &str) {}
}

impl Stream for Request {
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        Ok([(":method", "GET"), (":path", "/v1/x"), (":authority", "api"), ("authorization", &format!("Bearer {KEY}"))]
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect())
    }
    fn remove_request_header(&mut self, _: &str) -> bool {
        true
    }
    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        Ok(Vec::new())
    }
    fn remove_request_trailer(&mut self, _: &str) -> bool {
        true
    }
    fn set_request_header(&mut self, _: &str, _: &str) -> bool {
        true
    }
    fn send_response(&mut self, status: u16, _: &[(&str, &str)], _: &str) {
        self.sent = Some(status);
    }
    fn increment_counter(&mut self, _: usize) {}
}

fn status(filter: &Filter) -> u16 {
    let mut request = Request::default();
    match filter.on_request_headers(&mut request) {
        Verdict::Continue => 200,
        Verdict::Stop => request.sent.unwrap_or(0),
    }
}

#[test]
fn ticks_and_answers_load_the_set_then_a_revocation_and_a_failing_endpoint_keep_the_last_good_one() {
    let mut host = FakeConfig::default();
    let filter = live_filter("/t1/manifest.json", &mut host);
    let fetch = FakeFetch::default();
    assert_eq!(status(&filter), 503, "before the first load");

    sync(&filter, &fetch, &mut host, &layout(false, "1"), 200);
    assert_eq!(status(&filter), 200);
    assert_eq!(host.gauge("keygate.key_set.version"), Some(1));
    assert_eq!(host.counter("keygate.key_set.syncs"), Some(1));

    std::thread::sleep(Duration::from_millis(550));
    sync(&filter, &fetch, &mut host, &layout(true, "2"), 200);
    assert_eq!(status(&filter), 401, "revoked");
    assert_eq!(host.gauge("keygate.key_set.keys"), Some(1));
    assert_eq!(host.gauge("keygate.keys"), Some(1));

    std::thread::sleep(Duration::from_millis(550));
    sync(&filter, &fetch, &mut host, &layout(false, "3"), 503);
    assert_eq!(status(&filter), 401, "the endpoint failing keeps version 2");
    assert_eq!(host.counter("keygate.key_set.sync_failures"), Some(1));
    assert!(host.lines.borrow().iter().any(|l| l.contains("key-set sync failed")), "{:?}", host.lines.borrow());

    // Envoy refusing the callout is a failed sync too, never a change.
    *fetch.refuse.borrow_mut() = true;
    std::thread::sleep(Duration::from_millis(5_100));
    filter.on_tick(&fetch, &mut host);
    assert_eq!(host.counter("keygate.key_set.sync_failures"), Some(2));
    assert_eq!(status(&filter), 401);
}

#[test]
fn configurations_of_one_key_set_share_one_store_and_one_poll() {
    let (mut first_host, mut second_host) = (FakeConfig::default(), FakeConfig::default());
    let first = live_filter("/t2/manifest.json", &mut first_host);
    let second = live_filter("/t2/manifest.json", &mut second_host);
    let fetch = FakeFetch::default();
    sync(&first, &fetch, &mut first_host, &layout(false, "1"), 200);
    assert_eq!(status(&second), 200, "the second configuration reads what the first loaded");
    second.on_tick(&fetch, &mut second_host);
    assert!(fetch.asked.borrow().is_empty(), "the lease lets one configuration poll");

    // The first one destroyed (replaced, say) lets the lease go: the second polls when the next
    // poll is due, not once the lease (3 s) expires.
    drop(first);
    std::thread::sleep(Duration::from_millis(550));
    second.on_tick(&fetch, &mut second_host);
    assert_eq!(fetch.asked.borrow().len(), 1, "the second configuration took over the polling");
    answer_all(&second, &fetch, &mut second_host, &layout(false, "2"), 200);
    assert_eq!(second_host.gauge("keygate.key_set.version"), Some(2));

    // Once every configuration of the set is gone, so is its store: a new one starts empty.
    drop(second);
    let mut third_host = FakeConfig::default();
    let third = live_filter("/t2/manifest.json", &mut third_host);
    assert_eq!(status(&third), 503);
}

#[test]
fn answers_without_a_reply_read_as_status_zero_and_bodies_join_their_chunks() {
    let headers: Vec<(&[u8], &[u8])> = vec![(b":status", b"200"), (b"ETag", b"\"v1\"")];
    let answer = CalloutAnswer::new(true, &headers, vec![b"ab", b"", b"cd"]);
    assert_eq!((answer.status(), answer.etag().as_deref(), answer.body_size()), (200, Some("\"v1\""), 4));
    assert_eq!(answer.body(), b"abcd");
    let reset = CalloutAnswer::new(false, &headers, vec![b"ab"]);
    assert_eq!((reset.status(), reset.body_size()), (0, 0));
    let no_status = CalloutAnswer::new(true, &[], vec![]);
    assert_eq!(no_status.status(), 0);
    assert_eq!(callout_token(7), Ok(7));
    assert!(callout_token(u64::from(u32::MAX) + 1).is_err());
}

#[test]
fn a_ticker_ticks_every_period_and_stops_and_joins_when_dropped() {
    let ticks = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&ticks);
    let ticker = Ticker::start(Duration::from_millis(20), move || {
        counted.fetch_add(1, Ordering::SeqCst);
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(210));
    let started = Instant::now();
    drop(ticker);
    assert!(started.elapsed() < Duration::from_millis(100), "stopping waits for no period");
    let seen = ticks.load(Ordering::SeqCst);
    assert!((5..=11).contains(&seen), "{seen} ticks in 210 ms at 20 ms");
    std::thread::sleep(Duration::from_millis(60));
    assert_eq!(ticks.load(Ordering::SeqCst), seen, "no tick after the drop");
    assert_eq!(Arc::strong_count(&ticks), 1, "the thread let go of what it used");
}
