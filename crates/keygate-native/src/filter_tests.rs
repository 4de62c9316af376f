//! The module's hooks on the host, against a fake Envoy that records what it was asked: the
//! configuration hook's refusals and stats, the request path's edits and replies, and failing
//! closed on every host error. `crate::ffi` only turns Envoy's pointers into these calls; it runs
//! in Envoy in tests/native.rs.

use super::*;
use keygate_core::keys::hash_key;
use proptest::prelude::*;
use std::cell::RefCell;

const KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const UNSCOPED: &str = "sk_live_0000eeee_5555555555555555555555555555555555555555555555555555555555555555";

fn config() -> String {
    serde_json::json!({
        "credential": {"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]},
        "keys": [
            {"id": "0000aaaa", "hash": hex::encode(hash_key(KEY.as_bytes())), "org": "org_42",
             "scopes": ["venues:read"], "attributes": {"venue": "v_7"}},
            {"id": "0000eeee", "hash": hex::encode(hash_key(UNSCOPED.as_bytes())), "org": "org_43", "scopes": []}
        ],
        "routes": [
            {"path": "/healthz", "public": true},
            {"methods": ["GET"], "path": "/v1/venues/{venue_id}", "scopes": ["venues:read"], "bind": {"venue_id": "venue"}}
        ],
        "upstream": {"attribute_headers": {"venue": "x-venue-id"}}
    })
    .to_string()
}

/// Log lines, shared by both fakes.
#[derive(Default)]
struct Lines(RefCell<Vec<(Level, String)>>);

impl Lines {
    fn at(&self, level: Level) -> Vec<String> {
        self.0.borrow().iter().filter(|(l, _)| *l == level).map(|(_, m)| m.clone()).collect()
    }
}

impl Log for Lines {
    fn enabled(&self, _: Level) -> bool {
        true
    }
    fn log(&self, level: Level, message: &str) {
        self.0.borrow_mut().push((level, message.to_string()));
    }
}

#[derive(Default)]
struct FakeConfig {
    log: Lines,
    counters: Vec<String>,
    gauges: Vec<(String, Option<u64>)>,
    /// Counters counted on the configuration (the key-set sync's), by id.
    counted: Vec<usize>,
    refuse_stats: bool,
}

impl Log for FakeConfig {
    fn enabled(&self, level: Level) -> bool {
        self.log.enabled(level)
    }
    fn log(&self, level: Level, message: &str) {
        self.log.log(level, message);
    }
}

impl ConfigHost for FakeConfig {
    fn define_counter(&mut self, name: &str) -> Option<usize> {
        self.counters.push(name.to_string());
        (!self.refuse_stats).then_some(self.counters.len() - 1)
    }
    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        self.gauges.push((name.to_string(), None));
        (!self.refuse_stats).then_some(self.gauges.len() - 1)
    }
    fn set_gauge(&mut self, id: usize, value: u64) {
        self.gauges[id].1 = Some(value);
    }
    fn increment_counter(&mut self, id: usize) {
        self.counted.push(id);
    }
}

/// A reply the module sent: status, headers, body.
type Sent = (u16, Vec<(String, String)>, String);

/// A stream with Envoy's header-map semantics (names lower-cased, `set` replaces every copy), and
/// switches that make each host call fail.
#[derive(Default)]
struct FakeStream {
    headers: Vec<(String, Vec<u8>)>,
    unreadable: Option<Unreadable>,
    fail_remove: bool,
    fail_set: bool,
    trailers: Vec<(String, Vec<u8>)>,
    trailers_unreadable: Option<Unreadable>,
    fail_remove_trailer: bool,
    /// A defect in a host call: removing a header panics.
    panic_in_remove: bool,
    sent: Vec<Sent>,
    counted: Vec<usize>,
    log: Lines,
}

impl FakeStream {
    fn new(headers: &[(&str, &str)]) -> FakeStream {
        FakeStream {
            headers: headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect(),
            ..FakeStream::default()
        }
    }

    fn values(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n == name).map(|(_, v)| String::from_utf8_lossy(v).into_owned()).collect()
    }
}

impl Log for FakeStream {
    fn enabled(&self, level: Level) -> bool {
        self.log.enabled(level)
    }
    fn log(&self, level: Level, message: &str) {
        self.log.log(level, message);
    }
}

impl Stream for FakeStream {
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        match self.unreadable {
            Some(why) => Err(why),
            None => Ok(self.headers.clone()),
        }
    }
    fn remove_request_header(&mut self, name: &str) -> bool {
        assert!(!self.panic_in_remove, "a defect in a host call");
        assert!(self.sent.is_empty(), "{name} removed after the reply");
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(n, _)| *n != name);
        !self.fail_remove
    }
    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        match self.trailers_unreadable {
            Some(why) => Err(why),
            None => Ok(self.trailers.clone()),
        }
    }
    fn remove_request_trailer(&mut self, name: &str) -> bool {
        if self.fail_remove_trailer {
            return false;
        }
        let name = name.to_ascii_lowercase();
        self.trailers.retain(|(n, _)| *n != name);
        true
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> bool {
        assert!(!value.is_empty(), "set {name} to an empty value, which Envoy 1.40 turns into a removal");
        if self.fail_set {
            return false;
        }
        let name = name.to_ascii_lowercase();
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.as_bytes().to_vec()));
        true
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        self.sent.push((status, headers, body.to_string()));
    }
    fn increment_counter(&mut self, id: usize) {
        self.counted.push(id);
    }
}

fn filter() -> (Filter, FakeConfig) {
    let mut host = FakeConfig::default();
    let filter = configure(b"keygate", config().as_bytes(), &mut host).expect("the test configuration compiles");
    (filter, host)
}

fn request(method: &str, path: &str, more: &[(&str, &str)]) -> FakeStream {
    let mut headers = vec![(":method", method), (":path", path), (":authority", "api"), (":scheme", "http")];
    headers.extend_from_slice(more);
    FakeStream::new(&headers)
}

#[test]
fn configuration_defines_every_stat_and_the_key_gauge() {
    let (_, host) = filter();
    let mut expected = vec!["keygate.allowed".to_string()];
    expected.extend(DenyKind::ALL.iter().map(|k| format!("keygate.denied.{}", k.name())));
    assert_eq!(host.counters, expected);
    assert_eq!(host.gauges, [("keygate.keys".to_string(), Some(2))]);
    assert_eq!(host.log.at(Level::Info), ["keygate: configured with 2 inline keys, 2 routes"]);
}

#[test]
fn invalid_configuration_is_refused_naming_the_field() {
    let mut host = FakeConfig::default();
    assert!(configure(b"keygate", br#"{"keyz": []}"#, &mut host).is_none());
    let errors = host.log.at(Level::Error);
    let [error] = errors.as_slice() else { panic!("one error expected: {errors:?}") };
    assert!(error.starts_with("keygate: invalid configuration: keyz: unknown field `keyz`"), "{error}");
    assert!(host.counters.is_empty(), "no stat is defined for a refused configuration");
}

/// A usage POST that Envoy would send: the body kept, callout 1.
#[derive(Default)]
struct Posted(RefCell<Vec<Vec<u8>>>);

impl keygate_core::usage::Post for Posted {
    fn post(&self, _: &str, _: &[(&str, &str)], body: &[u8], _: u64) -> Result<u32, String> {
        self.0.borrow_mut().push(body.to_vec());
        Ok(1)
    }
}

#[test]
fn a_usage_block_counts_each_decision_for_the_process_report() {
    let mut config: serde_json::Value = serde_json::from_str(&config()).unwrap();
    config["usage"] =
        serde_json::json!({"cluster": "usage-filter-test", "authority": "usage.internal", "path": "/usage"});
    let mut host = FakeConfig::default();
    let filter = configure(b"keygate", config.to_string().as_bytes(), &mut host).unwrap();
    assert_eq!(host.log.at(Level::Info), ["keygate: configured with 2 inline keys, 2 routes, usage reporting"]);
    assert!(host.counters.iter().any(|c| c == "keygate.usage.reports_sent"));
    assert_eq!(filter.tick(), Some(std::time::Duration::from_millis(1_000)), "a tenth of the default interval");
    let auth = format!("Bearer {KEY}");
    assert_eq!(
        filter.on_request_headers(&mut request("GET", "/v1/venues/v_7", &[("authorization", &auth)])),
        Verdict::Continue
    );
    assert_eq!(filter.on_request_headers(&mut request("GET", "/v1/venues/v_7", &[])), Verdict::Stop);
    let usage = filter.usage.as_ref().unwrap();
    let posted = Posted::default();
    usage.on_tick_at(0, 1_800_000_000, &posted, &mut host);
    usage.on_tick_at(10_000, 1_800_000_010, &posted, &mut host);
    let report = keygate_core::usage::Report::parse(&posted.0.borrow()[0]).unwrap();
    assert_eq!(report.keys["0000aaaa"].allowed, 1);
    assert_eq!(report.unattributed.get(DenyKind::MissingKey), 1);
    // A bad `usage` block is refused naming the field.
    config["usage"]["path"] = serde_json::json!("usage");
    let mut host = FakeConfig::default();
    assert!(configure(b"keygate", config.to_string().as_bytes(), &mut host).is_none());
    assert_eq!(
        host.log.at(Level::Error),
        ["keygate: invalid configuration: usage.path: must be a path starting with '/'"]
    );
}

#[test]
fn empty_configuration_is_refused() {
    let mut host = FakeConfig::default();
    assert!(configure(b"keygate", b"", &mut host).is_none());
    assert!(host.log.at(Level::Error)[0].starts_with("keygate: invalid configuration: "));
}

#[test]
fn live_key_set_configures_its_stats_and_refuses_before_the_first_load() {
    let mut text: serde_json::Value = serde_json::from_str(&config()).unwrap();
    text["key_set"] =
        serde_json::json!({"cluster": "keyset", "path": "/keyset/manifest.json", "authority": "unit.filter"});
    let mut host = FakeConfig::default();
    let filter = configure(b"keygate", text.to_string().as_bytes(), &mut host).expect("a live key set is supported");
    assert_eq!(filter.tick(), Some(std::time::Duration::from_millis(400)), "a fifth of the default poll interval");
    for name in ["keygate.key_set.syncs", "keygate.key_set.sync_failures"] {
        assert!(host.counters.contains(&name.to_string()), "{name}: {:?}", host.counters);
    }
    for name in ["keygate.key_set.version", "keygate.key_set.keys", "keygate.key_set.seconds_since_sync"] {
        assert!(host.gauges.iter().any(|(n, _)| n == name), "{name}: {:?}", host.gauges);
    }
    // An inline key still passes; any other key waits for the set.
    let mut stream = request("GET", "/v1/venues/v_7", &[("authorization", &format!("Bearer {KEY}"))]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Continue);
    let other = "sk_live_0000ffff_7777777777777777777777777777777777777777777777777777777777777777";
    let mut stream = request("GET", "/v1/venues/v_7", &[("authorization", &format!("Bearer {other}"))]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    assert_eq!(stream.sent[0].0, 503);
    assert!(stream.sent[0].2.contains("key_set_unavailable"), "{:?}", stream.sent);
}

#[test]
fn another_filter_name_is_refused() {
    let mut host = FakeConfig::default();
    assert!(configure(b"other", config().as_bytes(), &mut host).is_none());
    assert_eq!(
        host.log.at(Level::Error),
        ["keygate: unknown filter_name \"other\": this module has one filter, \"keygate\""]
    );
}

#[test]
fn stats_envoy_refuses_leave_the_filter_working() {
    let mut host = FakeConfig { refuse_stats: true, ..FakeConfig::default() };
    let filter = configure(b"keygate", config().as_bytes(), &mut host).expect("stats are not required");
    assert_eq!(host.log.at(Level::Warn).len(), 1 + DenyKind::ALL.len() + 1);
    let mut stream = request("GET", "/v1/venues/v_7", &[]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    assert!(stream.counted.is_empty());
}

#[test]
fn missing_key_is_refused_with_the_rendered_reply_and_counted() {
    let (filter, host) = filter();
    let mut stream = request("GET", "/v1/venues/v_7", &[("x-request-id", "rid-1")]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    let [(status, headers, body)] = stream.sent.as_slice() else { panic!("one reply expected") };
    assert_eq!(*status, 401);
    assert!(headers.contains(&("content-type".into(), "application/json".into())), "{headers:?}");
    assert!(headers.contains(&("www-authenticate".into(), r#"Bearer realm="api""#.into())), "{headers:?}");
    assert!(body.contains("missing_api_key"), "{body}");
    let missing = host.counters.iter().position(|c| c == "keygate.denied.missing_key").unwrap();
    assert_eq!(stream.counted, [missing]);
    assert_eq!(stream.log.at(Level::Debug), ["keygate: denied missing_key"]);
}

#[test]
fn allowed_request_loses_its_key_and_gains_its_identity() {
    let (filter, host) = filter();
    let auth = format!("Bearer {KEY}");
    let mut stream = request("GET", "/v1/venues/v_7", &[("authorization", &auth), ("x-org-id", "org_evil")]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Continue);
    assert!(stream.sent.is_empty());
    assert!(stream.values("authorization").is_empty());
    assert_eq!(stream.values("x-org-id"), ["org_42"]);
    assert_eq!(stream.values("x-api-key-id"), ["0000aaaa"]);
    assert_eq!(stream.values("x-api-key-scopes"), ["venues:read"]);
    assert_eq!(stream.values("x-venue-id"), ["v_7"]);
    assert_eq!(stream.counted, [host.counters.iter().position(|c| c == "keygate.allowed").unwrap()]);
    assert_eq!(stream.log.at(Level::Debug), ["keygate: allowed key 0000aaaa"]);
}

#[test]
fn a_refused_request_loses_every_spoofed_identity_before_its_reply() {
    let (filter, host) = filter();
    let spoofed = [
        ("x-api-key-id", "0000aaaa"),
        ("x-org-id", "org_42"),
        ("x_org_id", "org_42"),
        ("x.api.key.id", "0000aaaa"),
        ("x-venue-id", "v_7"),
        ("x-checksum", "abc"),
    ];
    let (auth, wrong) = (format!("Bearer {KEY}"), "Bearer sk_live_0000aaaa_wrong".to_string());
    let refused = [
        ("/v1/venues/v_7", None, 401, "missing_key"),
        ("/v1/venues/v_7", Some(&wrong), 401, "invalid_key"),
        ("/v1/venues/v_8", Some(&auth), 403, "forbidden"),
    ];
    for (path, auth, status, kind) in refused {
        let mut more = spoofed.to_vec();
        more.extend(auth.map(|a| ("authorization", a.as_str())));
        let mut stream = request("GET", path, &more);
        assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
        assert_eq!(stream.sent.iter().map(|(s, _, _)| *s).collect::<Vec<_>>(), [status], "{path} {kind}");
        let left: Vec<&str> = stream.headers.iter().map(|(n, _)| n.as_str()).filter(|n| !n.starts_with(':')).collect();
        let kept: &[&str] = if auth.is_some() { &["x-checksum", "authorization"] } else { &["x-checksum"] };
        assert_eq!(left, kept, "{path} {kind}: the spoofed identity goes, nothing else");
        let counter = format!("keygate.denied.{kind}");
        assert_eq!(stream.counted, [host.counters.iter().position(|c| *c == counter).unwrap()]);
    }
}

#[test]
fn a_refusal_whose_identity_cannot_be_removed_is_still_refused_as_it_was() {
    let (filter, host) = filter();
    let mut stream = request("GET", "/v1/venues/v_7", &[("x-api-key-id", "0000aaaa")]);
    stream.fail_remove = true;
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    let [(status, _, body)] = stream.sent.as_slice() else { panic!("one reply expected: {:?}", stream.sent) };
    assert_eq!(*status, 401);
    assert!(body.contains("missing_api_key"), "{body}");
    assert_eq!(stream.log.at(Level::Error), ["keygate: cannot remove header x-api-key-id"]);
    assert_eq!(stream.counted, [host.counters.iter().position(|c| c == "keygate.denied.missing_key").unwrap()]);
}

#[test]
fn an_empty_identity_value_removes_the_header() {
    let (filter, _) = filter();
    let mut stream = request("POST", "/v2/other", &[("x-api-key", UNSCOPED), ("x-api-key-scopes", "*")]);
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Continue);
    assert!(stream.values("x-api-key-scopes").is_empty());
    assert_eq!(stream.values("x-api-key-id"), ["0000eeee"]);
}

fn trailers(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
}

#[test]
fn an_allowed_requests_trailers_lose_every_key_and_identity_and_keep_the_rest() {
    let (filter, _) = filter();
    let auth = format!("Bearer {KEY}");
    let mut stream = request("POST", "/v1/venues/v_7", &[("authorization", &auth)]);
    stream.trailers = trailers(&[
        ("authorization", &auth),
        ("x-checksum", "abc"),
        ("x_org_id", "org_evil"),
        ("x-api-key", UNSCOPED),
        ("x.venue.id", "v_8"),
        ("x-original-url", "/v1/venues/v_8"),
    ]);
    let verdict = filter.on_request_headers(&mut stream);
    assert_eq!(filter.on_request_trailers(&mut stream, Some(verdict)), Verdict::Continue);
    assert_eq!(stream.trailers, trailers(&[("x-checksum", "abc")]));
    assert!(stream.sent.is_empty());
}

#[test]
fn a_refused_requests_trailers_stay_stopped_with_no_second_reply() {
    let (filter, _) = filter();
    let mut stream = request("POST", "/v1/venues/v_7", &[]);
    stream.trailers = trailers(&[("authorization", &format!("Bearer {KEY}"))]);
    let verdict = filter.on_request_headers(&mut stream);
    assert_eq!(verdict, Verdict::Stop);
    assert_eq!(filter.on_request_trailers(&mut stream, Some(verdict)), Verdict::Stop);
    assert_eq!(stream.sent.len(), 1, "the 401 alone: {:?}", stream.sent);
    assert_eq!(stream.sent[0].0, 401);
}

#[test]
fn trailers_before_a_verdict_refuse_the_request() {
    let (filter, _) = filter();
    let mut stream = request("POST", "/healthz", &[]);
    stream.trailers = trailers(&[("x-checksum", "abc")]);
    assert_eq!(filter.on_request_trailers(&mut stream, None), Verdict::Stop);
    assert_internal_error(&stream, "request trailers before a decision");
}

#[test]
fn unreadable_or_unedited_trailers_refuse_the_request() {
    let (filter, _) = filter();
    let mut stream = request("POST", "/healthz", &[]);
    stream.trailers_unreadable = Some(Unreadable::Host);
    assert_eq!(filter.on_request_trailers(&mut stream, Some(Verdict::Continue)), Verdict::Stop);
    assert_internal_error(&stream, "request trailers unreadable");
    assert_eq!(stream.log.at(Level::Error), ["keygate: cannot read request trailers: Host"]);

    let mut stream = request("POST", "/healthz", &[]);
    stream.trailers = trailers(&[("x-checksum", "abc"), ("x-org-id", "org_evil")]);
    stream.fail_remove_trailer = true;
    assert_eq!(filter.on_request_trailers(&mut stream, Some(Verdict::Continue)), Verdict::Stop);
    assert_internal_error(&stream, "trailer edit failed");
    assert_eq!(stream.log.at(Level::Error), ["keygate: cannot remove trailer x-org-id"]);

    // Nothing to remove: no edit is asked, so none can fail.
    let mut stream = request("POST", "/healthz", &[]);
    stream.trailers = trailers(&[("x-checksum", "abc")]);
    stream.fail_remove_trailer = true;
    assert_eq!(filter.on_request_trailers(&mut stream, Some(Verdict::Continue)), Verdict::Continue);
    assert!(stream.sent.is_empty());
}

fn assert_internal_error(stream: &FakeStream, message: &str) {
    let [(status, headers, body)] = stream.sent.as_slice() else { panic!("one reply expected: {:?}", stream.sent) };
    assert_eq!(*status, 500);
    assert_eq!(headers, &[("content-type".to_string(), "application/json".to_string())]);
    assert_eq!(body, &format!("{{\"error\":\"internal_error\",\"message\":\"{message}\"}}"));
    assert!(stream.counted.is_empty(), "a refused request counts as neither allowed nor denied");
}

#[test]
fn unreadable_headers_refuse_the_request() {
    let (filter, _) = filter();
    for why in [Unreadable::Host, Unreadable::NameNotUtf8] {
        let mut stream = request("GET", "/healthz", &[]);
        stream.unreadable = Some(why);
        assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
        assert_internal_error(&stream, "request headers unreadable");
        assert_eq!(stream.log.at(Level::Error), [format!("keygate: cannot read request headers: {why:?}")]);
    }
}

#[test]
fn a_failed_header_edit_refuses_the_request() {
    let (filter, _) = filter();
    let auth = format!("Bearer {KEY}");
    let mut stream = request("GET", "/v1/venues/v_7", &[("authorization", &auth)]);
    stream.fail_remove = true;
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    assert_internal_error(&stream, "header edit failed");
    assert_eq!(stream.log.at(Level::Error), ["keygate: cannot remove header authorization"]);

    let mut stream = request("GET", "/v1/venues/v_7", &[("authorization", &auth)]);
    stream.fail_set = true;
    assert_eq!(filter.on_request_headers(&mut stream), Verdict::Stop);
    assert_internal_error(&stream, "header edit failed");
    assert_eq!(stream.log.at(Level::Error), ["keygate: cannot set header x-org-id"]);
}

#[test]
fn envoy_headers_become_the_view_in_order_with_repeats() {
    let pairs: [(&[u8], &[u8]); 4] =
        [(b":path", b"/a"), (b"x-api-key", b"k1"), (b"x-api-key", b"k2"), (b"x-bin", b"\xff\x00")];
    let owned = owned_headers(pairs.iter().copied()).unwrap();
    assert_eq!(
        owned,
        [
            (":path".to_string(), b"/a".to_vec()),
            ("x-api-key".to_string(), b"k1".to_vec()),
            ("x-api-key".to_string(), b"k2".to_vec()),
            ("x-bin".to_string(), b"\xff\x00".to_vec()),
        ]
    );
    let bad: [(&[u8], &[u8]); 1] = [(b"x-\xff", b"v")];
    assert_eq!(owned_headers(bad.iter().copied()), Err(Unreadable::NameNotUtf8));
}

/// Header names a request may carry: credentials, identity headers and their CGI twins, overrides
/// and noise.
fn header_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("authorization".to_string()),
        Just("x-api-key".to_string()),
        Just("x-org-id".to_string()),
        Just("x_org_id".to_string()),
        Just("x-api-key-id".to_string()),
        Just("x-api-key-scopes".to_string()),
        Just("x-venue-id".to_string()),
        Just("x.venue.id".to_string()),
        Just("x-http-method-override".to_string()),
        Just("x-original-url".to_string()),
        Just("x-request-id".to_string()),
        "[a-z-]{1,12}",
    ]
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(format!("Bearer {KEY}")),
        Just(KEY.to_string()),
        Just(UNSCOPED.to_string()),
        Just(format!("Token {KEY}")),
        Just("GET".to_string()),
        Just("/v1/venues/v_8".to_string()),
        "[ -~]{0,20}",
    ]
}

proptest! {
    /// Whatever the headers, the module does what the core decided and nothing else: an allowed
    /// request goes on with exactly the core's edits applied (an empty value as a removal), a
    /// denied one stops with the core's reply, and a failing host call always stops it with a 500.
    #[test]
    fn the_hook_carries_out_the_cores_decision(
        method in prop_oneof![Just("GET"), Just("POST"), Just("get")],
        path in prop_oneof![Just("/v1/venues/v_7"), Just("/v1/venues/v_8"), Just("/healthz"), Just("/v2/x"), Just("/v1/venues/v_7/../v_8")],
        headers in proptest::collection::vec((header_name(), header_value()), 0..6),
        fail_remove in any::<bool>(),
        fail_set in any::<bool>(),
    ) {
        let (filter, _) = filter();
        let more: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut stream = request(method, path, &more);
        stream.fail_remove = fail_remove;
        stream.fail_set = fail_set;
        let before = stream.headers.clone();
        let verdict = filter.on_request_headers(&mut stream);

        let view = RequestView::from_headers(&before);
        match filter.policy.decide(&filter.policy.keys, &view, &now_ms) {
            Decision::Allow { edits, .. } => {
                let removes = !edits.remove.is_empty() || edits.set.iter().any(|(_, v)| v.is_empty());
                let sets = edits.set.iter().any(|(_, v)| !v.is_empty());
                if (fail_remove && removes) || (fail_set && sets) {
                    prop_assert_eq!(verdict, Verdict::Stop);
                    prop_assert_eq!(stream.sent.len(), 1);
                    prop_assert_eq!(stream.sent[0].0, 500);
                } else {
                    prop_assert_eq!(verdict, Verdict::Continue);
                    prop_assert!(stream.sent.is_empty());
                    let mut expected = before.clone();
                    for name in &edits.remove {
                        expected.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                    }
                    for (name, value) in &edits.set {
                        expected.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                        if !value.is_empty() {
                            expected.push((name.to_string(), value.as_bytes().to_vec()));
                        }
                    }
                    prop_assert_eq!(&stream.headers, &expected);
                }
            }
            Decision::Deny(denial) => {
                prop_assert_eq!(verdict, Verdict::Stop);
                let mut expected = before.clone();
                for name in &denial.remove {
                    expected.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
                }
                prop_assert_eq!(&stream.headers, &expected, "a refused request loses only its spoofed identity");
                let [(status, _, _)] = stream.sent.as_slice() else { panic!("one reply expected") };
                let reply = filter.policy.replies.render(denial.kind, &denial.missing_scopes, "");
                prop_assert_eq!(*status, reply.status);
            }
        }
    }
}

#[test]
fn a_panic_under_a_stream_hook_refuses_the_request_for_good() {
    let (filter, _) = filter();
    let auth = format!("Bearer {KEY}");
    let mut stream = request("POST", "/v1/venues/v_7", &[("authorization", &auth)]);
    stream.panic_in_remove = true;
    let hooks = Request::default();
    assert_eq!(hooks.on_headers(Some(&filter), &mut stream), Verdict::Stop);
    assert_internal_error(&stream, "internal error");
    assert_eq!(stream.log.at(Level::Error), ["keygate: internal error on the request path"]);
    stream.trailers = trailers(&[("x-checksum", "abc")]);
    assert_eq!(hooks.on_trailers(Some(&filter), &mut stream), Verdict::Stop, "trailers do not resume it");
    assert_eq!(stream.sent.len(), 1, "and no second reply");
}

#[test]
fn a_stream_without_a_configuration_is_refused() {
    let mut stream = request("GET", "/healthz", &[]);
    assert_eq!(Request::default().on_headers(None, &mut stream), Verdict::Stop);
    assert_internal_error(&stream, "keygate is not configured");
    let mut stream = request("GET", "/healthz", &[]);
    assert_eq!(Request::default().on_trailers(None, &mut stream), Verdict::Stop);
    assert_internal_error(&stream, "keygate is not configured");
}

#[test]
fn a_panic_in_a_hook_becomes_its_fail_closed_answer() {
    let mut stream = request("GET", "/healthz", &[]);
    let verdict = guarded(|| refuse(&mut stream, "internal error"), || -> Verdict { panic!("a defect") });
    assert_eq!(verdict, Verdict::Stop);
    assert_internal_error(&stream, "internal error");
    assert_eq!(guarded(|| 0, || 7), 7);
}

#[path = "filter_props.rs"]
mod props;
