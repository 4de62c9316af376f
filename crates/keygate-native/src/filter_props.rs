//! Property tests of the module's entry points, beside the core's own: a crash in the native
//! module takes Envoy down (there is no failure policy), so the hooks' safe half is driven here
//! with arbitrary input, as Envoy could hand it over. Header names and values as raw bytes (not
//! UTF-8, empty, huge, repeated), read through `owned_headers` as `crate::ffi` reads them, with any
//! host call failing; mutations of valid configurations; callout answers of any status, headers,
//! body and announced size, in any order, with a configuration destroyed while its callouts are
//! out; and a stream's hooks in odd orders (trailers before the headers' verdict, after a refusal,
//! twice). Each property: no panic, nothing forwarded that the core refuses, and a failing host
//! call refuses the request.
//!
//! Test code only: its parent declares it under #[cfg(test)], so unwrap and panic are fine here.

use super::*;
use keygate_core::layout::{Layout, Record};
use serde_json::{json, Value};

/// A stream as Envoy hands it to the FFI: header and trailer names as bytes (lower-case, as
/// Envoy's maps keep them, but not necessarily UTF-8), read through [`owned_headers`] exactly as
/// `crate::ffi` reads them. From its `fail_from`-th mutating call on, every one fails.
#[derive(Default)]
struct RawStream {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    trailers: Vec<(Vec<u8>, Vec<u8>)>,
    fail_from: Option<usize>,
    calls: usize,
    sent: Vec<Sent>,
    counted: Vec<usize>,
    log: Lines,
}

impl RawStream {
    /// Whether the next mutating call is carried out.
    fn call(&mut self) -> bool {
        self.calls += 1;
        self.fail_from.is_none_or(|n| self.calls <= n)
    }
}

impl Log for RawStream {
    fn enabled(&self, level: Level) -> bool {
        self.log.enabled(level)
    }
    fn log(&self, level: Level, message: &str) {
        self.log.log(level, message);
    }
}

fn read(map: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
    owned_headers(map.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
}

fn remove_from(map: &mut Vec<(Vec<u8>, Vec<u8>)>, name: &str) {
    map.retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_bytes()));
}

impl Stream for RawStream {
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        read(&self.headers)
    }
    fn remove_request_header(&mut self, name: &str) -> bool {
        let done = self.call();
        if done {
            remove_from(&mut self.headers, name);
        }
        done
    }
    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        read(&self.trailers)
    }
    fn remove_request_trailer(&mut self, name: &str) -> bool {
        let done = self.call();
        if done {
            remove_from(&mut self.trailers, name);
        }
        done
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> bool {
        assert!(!value.is_empty(), "set {name} to an empty value, which Envoy 1.40 turns into a removal");
        let done = self.call();
        if done {
            remove_from(&mut self.headers, name);
            self.headers.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        done
    }
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        let headers = headers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect();
        self.sent.push((status, headers, body.to_string()));
    }
    fn increment_counter(&mut self, id: usize) {
        self.counted.push(id);
    }
}

/// Names keygate reads or sets, in spellings it guards, pseudo-headers, and noise.
const NAMES: [&str; 18] = [
    ":method",
    ":path",
    "authorization",
    "x-api-key",
    "x_api_key",
    "x-org-id",
    "x_org_id",
    "x.org.id",
    "x-api-key-id",
    "x-api-key-scopes",
    "x-venue-id",
    "x~venue~id",
    "x-http-method-override",
    "x_original_url",
    "x-request-id",
    "x-checksum",
    "cookie",
    "",
];

/// A header or trailer name: one of [`NAMES`], or any bytes (lower-cased, as Envoy's maps are).
fn raw_name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        12 => prop::sample::select(NAMES.to_vec()).prop_map(|n| n.as_bytes().to_vec()),
        2 => "[a-z0-9_.~!-]{0,10}".prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..12).prop_map(|n| n.to_ascii_lowercase()),
    ]
}

/// A value: a key in its forms, a method or path, any bytes, or a huge one.
fn raw_value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::sample::select(vec![
            format!("Bearer {KEY}"),
            KEY.to_string(),
            format!("Basic eA==, Bearer {KEY}"),
            format!("{KEY}, {UNSCOPED}"),
            format!("Token {UNSCOPED}"),
            "GET".to_string(),
            "DELETE".to_string(),
            "/v1/venues/v_7".to_string(),
            "/v1/venues/v_8".to_string(),
            "/healthz".to_string(),
            String::new(),
        ])
        .prop_map(String::into_bytes),
        2 => prop::collection::vec(any::<u8>(), 0..48),
        1 => (any::<u8>(), 4_096usize..40_000).prop_map(|(c, n)| vec![c; n]),
        1 => (0usize..20_000).prop_map(|n| format!("Bearer sk_live_{}", "a".repeat(n)).into_bytes()),
    ]
}

/// A request's headers: `:method` and `:path` from a small set first, often a key, then anything.
fn raw_headers() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    let credential = prop::option::weighted(
        0.7,
        prop::sample::select(vec![
            ("authorization", format!("Bearer {KEY}")),
            ("x-api-key", KEY.to_string()),
            ("x-api-key", UNSCOPED.to_string()),
        ]),
    );
    (
        prop::sample::select(vec!["GET", "POST", "get", "HEAD", ""]),
        prop::sample::select(vec!["/v1/venues/v_7", "/v1/venues/v_8", "/healthz", "/v2/x", "/v1/venues/v_7/../v_8"]),
        credential,
        prop::collection::vec((raw_name(), raw_value()), 0..10),
    )
        .prop_map(|(method, path, credential, more)| {
            let mut headers =
                vec![(b":method".to_vec(), method.as_bytes().to_vec()), (b":path".to_vec(), path.as_bytes().to_vec())];
            headers.extend(credential.map(|(n, v)| (n.as_bytes().to_vec(), v.into_bytes())));
            headers.extend(more);
            headers
        })
}

/// A request the test configuration mostly allows: `KEY` on its venue, or a public path, and a
/// few more headers of any kind.
fn likely_allowed() -> impl Strategy<Value = Vec<(Vec<u8>, Vec<u8>)>> {
    (prop::sample::select(vec!["/v1/venues/v_7", "/healthz"]), prop::collection::vec((raw_name(), raw_value()), 0..4))
        .prop_map(|(path, more)| {
            let mut headers: Vec<(Vec<u8>, Vec<u8>)> = [
                (":method", "GET".to_string()),
                (":path", path.to_string()),
                ("authorization", format!("Bearer {KEY}")),
            ]
            .into_iter()
            .map(|(n, v)| (n.as_bytes().to_vec(), v.into_bytes()))
            .collect();
            headers.extend(more);
            headers
        })
}

/// `headers` with an allowed request's edits applied, as Envoy applies them (an empty value is a
/// removal, see `on_request_headers`).
fn edited(headers: &[(Vec<u8>, Vec<u8>)], edits: &keygate_core::policy::HeaderEdits<'_>) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut out = headers.to_vec();
    for name in &edits.remove {
        remove_from(&mut out, name);
    }
    for (name, value) in &edits.set {
        remove_from(&mut out, name);
        if !value.is_empty() {
            out.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
    }
    out
}

/// The number of host calls the hook makes to carry out an allowed request's edits.
fn edit_calls(edits: &keygate_core::policy::HeaderEdits<'_>) -> usize {
    edits.remove.len() + edits.set.len()
}

/// One configuration for every case of a property (compiling it is most of a case's cost).
fn shared_filter() -> &'static Filter {
    static FILTER: std::sync::OnceLock<Filter> = std::sync::OnceLock::new();
    FILTER.get_or_init(|| filter().0)
}

/// What the headers hook must have done with `before`: the core's decision, carried out, and
/// a host call that failed, or headers that cannot be read, refusing the request with a 500.
fn check_headers_hook(
    filter: &Filter,
    before: &[(Vec<u8>, Vec<u8>)],
    fail_from: Option<usize>,
    verdict: Verdict,
    stream: &RawStream,
) -> Result<(), TestCaseError> {
    let Ok(owned) = read(before) else {
        prop_assert_eq!(verdict, Verdict::Stop);
        prop_assert_eq!(stream.sent.len(), 1);
        prop_assert_eq!(stream.sent[0].0, 500);
        prop_assert_eq!(&stream.headers, &before.to_vec(), "unread headers are not edited");
        return Ok(());
    };
    match filter.policy.decide(&filter.policy.keys, &RequestView::from_headers(&owned), &now_ms) {
        Decision::Deny(denial) => {
            prop_assert_eq!(verdict, Verdict::Stop, "a refused request is never forwarded");
            let reply = filter.policy.reply(&denial, &RequestView::from_headers(&owned));
            prop_assert_eq!(stream.sent.len(), 1);
            prop_assert_eq!(stream.sent[0].0, reply.status);
            prop_assert_eq!(&stream.sent[0].2, &reply.body);
            // Its spoofed identity goes (up to the first removal that fails), and nothing else.
            let mut expected = before.to_vec();
            for name in denial.remove.iter().take(fail_from.unwrap_or(usize::MAX)) {
                remove_from(&mut expected, name);
            }
            prop_assert_eq!(&stream.headers, &expected, "a refused request loses only its spoofed identity");
        }
        Decision::Allow { edits, .. } if fail_from.is_some_and(|n| n < edit_calls(&edits)) => {
            prop_assert_eq!(verdict, Verdict::Stop, "a failed edit refuses the request");
            prop_assert_eq!(stream.sent.len(), 1);
            prop_assert_eq!(stream.sent[0].0, 500);
            prop_assert!(stream.counted.is_empty());
        }
        Decision::Allow { edits, .. } => {
            prop_assert_eq!(verdict, Verdict::Continue);
            prop_assert!(stream.sent.is_empty());
            prop_assert_eq!(&stream.headers, &edited(before, &edits));
        }
    }
    Ok(())
}

proptest! {
    /// Any bytes as headers, through the path the FFI takes (`owned_headers`, then the hook), with
    /// any mutating host call failing: the hook does exactly what the core decided, or refuses.
    #[test]
    fn headers_of_any_bytes_get_the_cores_decision_or_a_refusal(
        headers in raw_headers(),
        fail_from in prop::option::of(0usize..6),
    ) {
        let filter = shared_filter();
        let mut stream = RawStream { headers: headers.clone(), fail_from, ..RawStream::default() };
        let verdict = Request::default().on_headers(Some(filter), &mut stream);
        check_headers_hook(filter, &headers, fail_from, verdict, &stream)?;
    }

    /// A stream's hooks in any order and number, as far as the `Request` allows: trailers go on
    /// only after allowed headers, and then without a trailer keygate reads or sets; trailers
    /// before any verdict refuse the request; once refused, a request stays refused and gets no
    /// second reply.
    #[test]
    fn a_streams_hooks_in_any_order_never_let_trailers_resume_a_refused_request(
        headers in prop_oneof![raw_headers(), likely_allowed()],
        headers_first in prop::bool::weighted(0.7),
        events in prop::collection::vec(
            prop_oneof![1 => Just(None), 3 => prop::collection::vec((raw_name(), raw_value()), 0..8).prop_map(Some)],
            1..6,
        ),
        fail_from in prop::option::weighted(0.3, 0usize..8),
    ) {
        let events = if headers_first { std::iter::once(None).chain(events).collect() } else { events };
        let filter = shared_filter();
        let request = Request::default();
        let mut stream = RawStream { headers, fail_from, ..RawStream::default() };
        let mut last: Option<Verdict> = None;
        for event in events {
            let (replies, calls) = (stream.sent.len(), stream.calls);
            // The calls of this hook that fail: from the `fail_from`-th of the stream on.
            let fails_from = fail_from.map(|n| n.saturating_sub(calls));
            match event {
                // The headers hook (Envoy calls it once; a second call stands for a defect).
                None if last == Some(Verdict::Stop) => {
                    prop_assert_eq!(request.on_headers(Some(filter), &mut stream), Verdict::Stop);
                    prop_assert_eq!(stream.sent.len(), replies, "no second reply");
                }
                None => {
                    let before = stream.headers.clone();
                    let mut fresh = RawStream { headers: before.clone(), fail_from: fails_from, ..RawStream::default() };
                    let verdict = request.on_headers(Some(filter), &mut fresh);
                    check_headers_hook(filter, &before, fails_from, verdict, &fresh)?;
                    stream.headers = fresh.headers;
                    stream.sent.extend(fresh.sent);
                    stream.calls += fresh.calls;
                    last = Some(verdict);
                }
                Some(trailers) => {
                    stream.trailers = trailers.clone();
                    let verdict = request.on_trailers(Some(filter), &mut stream);
                    let owned = read(&trailers);
                    let removed = owned.as_ref().map(|t| filter.policy.trailers_to_remove(t).len()).unwrap_or(0);
                    let fails = fails_from.is_some_and(|n| n < removed);
                    match last {
                        Some(Verdict::Stop) => {
                            prop_assert_eq!(verdict, Verdict::Stop, "trailers never resume a refused request");
                            prop_assert_eq!(stream.sent.len(), replies, "no second reply");
                            prop_assert_eq!(&stream.trailers, &trailers, "nor are they edited");
                        }
                        None => {
                            prop_assert_eq!(verdict, Verdict::Stop, "trailers before a verdict refuse the request");
                            prop_assert_eq!(stream.sent.len(), replies + 1);
                            prop_assert_eq!(stream.sent[replies].0, 500);
                        }
                        Some(Verdict::Continue) if owned.is_err() || fails => {
                            prop_assert_eq!(verdict, Verdict::Stop);
                            prop_assert_eq!(stream.sent.len(), replies + 1);
                            prop_assert_eq!(stream.sent[replies].0, 500);
                        }
                        Some(Verdict::Continue) => {
                            prop_assert_eq!(verdict, Verdict::Continue);
                            prop_assert_eq!(stream.sent.len(), replies);
                            let owned = owned.unwrap();
                            let removed = filter.policy.trailers_to_remove(&owned);
                            let expected: Vec<(Vec<u8>, Vec<u8>)> = trailers
                                .iter()
                                .filter(|(n, _)| !removed.iter().any(|r| n.eq_ignore_ascii_case(r.as_bytes())))
                                .cloned()
                                .collect();
                            prop_assert_eq!(&stream.trailers, &expected);
                        }
                    }
                    if verdict == Verdict::Stop {
                        last = Some(Verdict::Stop);
                    }
                }
            }
        }
    }
}

/// Field names of the configuration, for mutations that add or replace a member.
const FIELDS: [&str; 24] = [
    "credential",
    "headers",
    "prefixes",
    "max_length",
    "keys",
    "id",
    "hash",
    "org",
    "scopes",
    "attributes",
    "revoked",
    "expires_at",
    "routes",
    "path",
    "methods",
    "public",
    "bind",
    "unmatched",
    "upstream",
    "org_header",
    "attribute_headers",
    "errors",
    "key_set",
    "cluster",
];

/// Any JSON value, shallow, with the edge cases a configuration meets.
fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        prop::sample::select(vec![0i64, -1, 1, 99, 100, 399, 400, 599, 600, 8192, 8193, i64::MIN, i64::MAX])
            .prop_map(Value::from),
        Just(json!(u64::MAX)),
        Just(json!(1e308)),
        Just(json!(0.5)),
        prop::sample::select(vec![
            "",
            " ",
            "*",
            "/",
            "/**",
            "/{x}",
            "/v1/venues/{venue_id}",
            "/v1/{a}/{a}",
            "sk_live_",
            "authorization",
            "x-org-id",
            "x_org_id",
            "host",
            "org",
            "venue",
            "deny",
            "authenticate",
            "{code}",
            "{nope}",
            "\u{0}",
            "é",
            "GET",
            "get",
            "2020-01-01T00:00:00Z",
        ])
        .prop_map(Value::from),
        "[ -~]{0,12}".prop_map(Value::from),
        (0usize..3000).prop_map(|n| Value::from("a".repeat(n))),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::vec((prop::sample::select(FIELDS.to_vec()), inner), 0..4)
                .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect())),
        ]
    })
}

/// One change to a configuration's JSON, at the node `path` leads to.
#[derive(Debug, Clone)]
enum Edit {
    Replace(Value),
    /// Removes the member or element the last step of the path names.
    Remove,
    /// Adds a member (an element, in an array).
    Insert(String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        any_json().prop_map(Edit::Replace),
        Just(Edit::Remove),
        (prop_oneof![prop::sample::select(FIELDS.to_vec()).prop_map(String::from), "[a-z_]{1,8}"], any_json())
            .prop_map(|(name, value)| Edit::Insert(name, value)),
    ]
}

/// Applies `edit` at the node `path` leads to (each step picks a child, modulo the count).
fn mutate(value: &mut Value, path: &[usize], edit: Edit) {
    let children = match value {
        Value::Object(map) => map.len(),
        Value::Array(items) => items.len(),
        _ => 0,
    };
    if let (Some(&step), true) = (path.first(), children > 0) {
        let at = step % children;
        if path.len() == 1 && matches!(edit, Edit::Remove) {
            match value {
                Value::Object(map) => {
                    let key = map.keys().nth(at).cloned().unwrap();
                    map.remove(&key);
                }
                Value::Array(items) => {
                    items.remove(at);
                }
                _ => {}
            }
            return;
        }
        let child = match value {
            Value::Object(map) => map.values_mut().nth(at).unwrap(),
            Value::Array(items) => &mut items[at],
            _ => unreachable!(),
        };
        return mutate(child, &path[1..], edit);
    }
    match (edit, value) {
        (Edit::Insert(name, new), Value::Object(map)) => {
            map.insert(name, new);
        }
        (Edit::Insert(_, new), Value::Array(items)) => items.push(new),
        (Edit::Insert(name, new), value) => *value = json!({ name: new }),
        (Edit::Replace(new), value) => *value = new,
        (Edit::Remove, value) => *value = Value::Null,
    }
}

/// The test configuration, with a live key set when `live`.
fn base_config(live: bool) -> Value {
    let mut value: Value = serde_json::from_str(&config()).unwrap();
    if live {
        value["key_set"] = json!({"cluster": "keyset", "path": "/props-config/manifest.json", "poll_interval_ms": 100});
    }
    value
}

/// A key-set endpoint that hands out tokens and remembers what was asked, or refuses.
#[derive(Default)]
struct Endpoint {
    next: std::cell::Cell<u32>,
    asked: RefCell<Vec<(u32, String)>>,
    refuse: std::cell::Cell<bool>,
}

impl keygate_core::live::Fetch for Endpoint {
    fn get(&self, cluster: &str, headers: &[(&str, &str)], _timeout_ms: u64) -> Result<u32, String> {
        if self.refuse.get() {
            return Err(format!("cannot call cluster {cluster:?}: callout refused (2)"));
        }
        let path = headers.iter().find(|(n, _)| *n == ":path").map(|(_, v)| v.to_string()).unwrap_or_default();
        self.next.set(self.next.get() + 1);
        self.asked.borrow_mut().push((self.next.get(), path));
        Ok(self.next.get())
    }
}

/// Sends `headers` through a fresh stream of `filter`; checks that the verdict and the replies
/// agree, and returns the verdict and the reply's status.
fn call(filter: &Filter, headers: &[(&str, &str)]) -> Result<(Verdict, Option<u16>), TestCaseError> {
    let mut stream = FakeStream::new(headers);
    let verdict = Request::default().on_headers(Some(filter), &mut stream);
    match verdict {
        Verdict::Continue => prop_assert!(stream.sent.is_empty()),
        Verdict::Stop => prop_assert_eq!(stream.sent.len(), 1),
    }
    Ok((verdict, stream.sent.first().map(|s| s.0)))
}

fn get(path: &str, auth: Option<&str>) -> Vec<(&'static str, String)> {
    let mut headers =
        vec![(":method", "GET".to_string()), (":path", path.to_string()), (":authority", "api".to_string())];
    if let Some(key) = auth {
        headers.push(("authorization", format!("Bearer {key}")));
    }
    headers
}

fn call_get(filter: &Filter, path: &str, auth: Option<&str>) -> Result<(Verdict, Option<u16>), TestCaseError> {
    let headers = get(path, auth);
    let borrowed: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    call(filter, &borrowed)
}

proptest! {
    /// A valid configuration changed anywhere (a member replaced, removed or added, the text cut
    /// or spliced), with any filter name and stats Envoy may refuse: `configure` refuses exactly
    /// what the core refuses (and the filter name it does not serve), with an error logged, and
    /// what it accepts serves requests and ticks without a panic.
    #[test]
    fn any_mutation_of_a_valid_configuration_is_refused_with_a_reason_or_serves(
        live in any::<bool>(),
        edits in prop::collection::vec((prop::collection::vec(0usize..16, 0..5), edit()), 0..4),
        splice in prop::option::weighted(0.2, (0usize..4_000, prop::collection::vec(any::<u8>(), 0..3))),
        name in prop_oneof![9 => Just(b"keygate".to_vec()), 1 => prop::collection::vec(any::<u8>(), 0..10)],
        refuse_stats in any::<bool>(),
    ) {
        let mut value = base_config(live);
        for (path, edit) in edits {
            mutate(&mut value, &path, edit);
        }
        let mut text = value.to_string().into_bytes();
        if let Some((at, bytes)) = splice {
            let at = at.min(text.len());
            let end = (at + 1).min(text.len());
            text.splice(at..end, bytes);
        }
        let mut host = FakeConfig { refuse_stats, ..FakeConfig::default() };
        let configured = configure(&name, &text, &mut host);
        let valid = name == b"keygate" && keygate_core::plugin::Plugin::from_json(&text).is_ok();
        prop_assert_eq!(configured.is_some(), valid, "{}", String::from_utf8_lossy(&text));
        let Some(filter) = configured else {
            prop_assert!(!host.log.at(Level::Error).is_empty(), "refused without a reason");
            return Ok(());
        };
        for (path, auth) in [("/healthz", None), ("/v1/venues/v_7", Some(KEY)), ("/v1/venues/v_7", None), ("/v2/x", Some(UNSCOPED))] {
            call_get(&filter, path, auth)?;
        }
        if filter.tick().is_some() {
            let endpoint = Endpoint::default();
            filter.on_tick(&endpoint, &mut host);
            filter.on_tick(&endpoint, &mut host);
        }
    }
}

/// A key no layout holds: never forwarded.
const STRANGER: &str = "sk_live_0000ffff_7777777777777777777777777777777777777777777777777777777777777777";

/// `KEY` in a live set only, valid or revoked, in 1 or 16 shards (built once: the answers
/// property asks for them on every answer).
fn key_layout(revoked: bool, digits: usize) -> &'static Layout {
    static LAYOUTS: std::sync::OnceLock<Vec<Layout>> = std::sync::OnceLock::new();
    let layouts = LAYOUTS.get_or_init(|| {
        let hash = hex::encode(keygate_core::keys::hash_key(KEY.as_bytes()));
        [(false, 0), (true, 0), (false, 1), (true, 1)]
            .into_iter()
            .map(|(revoked, digits)| {
                let json = json!({"id": "0000aaaa", "hash": hash, "org": "org_1", "scopes": ["venues:read"], "revoked": revoked})
                    .to_string();
                Layout::new(&[Record { hash: &hash, json: &json }], digits, if revoked { "2" } else { "1" }).unwrap()
            })
            .collect()
    });
    &layouts[usize::from(revoked) + 2 * digits]
}

/// The valid record as its shard holds it: only a body with it can make `KEY` valid.
fn valid_record() -> String {
    let hash = hex::encode(keygate_core::keys::hash_key(KEY.as_bytes()));
    json!({"id": "0000aaaa", "hash": hash, "org": "org_1", "scopes": ["venues:read"], "revoked": false}).to_string()
}

/// What an answer carries as its body.
#[derive(Debug, Clone)]
enum Body {
    /// The document asked for, from the layout the endpoint publishes now.
    Asked,
    /// The document asked for, from the other layout (a publication changing under the sync).
    Other,
    Truncated {
        at: usize,
    },
    Flipped {
        at: usize,
        bits: u8,
    },
    Garbage(Vec<u8>),
    /// Past the configured limits (`max_manifest_bytes`, `max_shard_bytes`).
    Huge,
}

/// The body size announced to the sync beside the body.
#[derive(Debug, Clone, Copy)]
enum Announced {
    Actual,
    Zero,
    More(usize),
    Most,
}

#[derive(Debug, Clone)]
enum Event {
    /// A tick of configuration 0 or 1.
    Tick(usize),
    /// An answer to one of the callouts a configuration has out: the endpoint's own (200, the
    /// document asked for, its size), or any other.
    Answer {
        to: usize,
        pick: usize,
        succeeded: bool,
        status: u16,
        etag: Option<String>,
        body: Body,
        size: Announced,
        split: usize,
    },
    /// The endpoint starts publishing the layout with the key revoked (or valid again).
    Publish(bool),
    /// An answer with a token the configuration never handed out.
    Stray { to: usize, token: u64, status: u16 },
    /// Envoy refusing (or again accepting) a configuration's callouts.
    Refuse(usize, bool),
    /// A configuration destroyed, callouts out or not; the next event for it makes a new one.
    Destroy(usize),
    /// A request with the live key, or with a key no layout holds.
    Request { to: usize, stranger: bool },
}

fn status() -> impl Strategy<Value = u16> {
    prop_oneof![4 => Just(200u16), 1 => Just(304u16), 1 => Just(404u16), 1 => Just(503u16), 1 => Just(0u16), 1 => any::<u16>()]
}

fn body() -> impl Strategy<Value = Body> {
    prop_oneof![
        2 => Just(Body::Asked),
        1 => Just(Body::Other),
        1 => any::<usize>().prop_map(|at| Body::Truncated { at }),
        1 => (any::<usize>(), 1u8..=255).prop_map(|(at, bits)| Body::Flipped { at, bits }),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(Body::Garbage),
        1 => Just(Body::Huge),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    let size = prop_oneof![6 => Just(Announced::Actual), 1 => Just(Announced::Zero), 1 => (1usize..5000).prop_map(Announced::More), 1 => Just(Announced::Most)];
    let answer = (
        0usize..2,
        any::<usize>(),
        prop::bool::weighted(0.6),
        status(),
        prop::option::of("\"[a-z0-9]{0,6}\""),
        body(),
        size,
        any::<usize>(),
    )
        .prop_map(|(to, pick, succeeded, status, etag, body, size, split)| Event::Answer {
            to,
            pick,
            succeeded,
            status,
            etag,
            body,
            size,
            split,
        });
    let clean = (0usize..2, any::<usize>(), any::<usize>()).prop_map(|(to, pick, split)| Event::Answer {
        to,
        pick,
        succeeded: true,
        status: 200,
        etag: None,
        body: Body::Asked,
        size: Announced::Actual,
        split,
    });
    prop_oneof![
        4 => (0usize..2).prop_map(Event::Tick),
        10 => clean,
        3 => answer,
        1 => any::<bool>().prop_map(Event::Publish),
        1 => (0usize..2, any::<u64>(), status()).prop_map(|(to, token, status)| Event::Stray { to, token, status }),
        1 => (0usize..2, prop::bool::weighted(0.3)).prop_map(|(to, refuse)| Event::Refuse(to, refuse)),
        1 => (0usize..2).prop_map(Event::Destroy),
        3 => (0usize..2, any::<bool>()).prop_map(|(to, stranger)| Event::Request { to, stranger }),
    ]
}

/// One configuration of the answers property, with its own endpoint (callout ids are per
/// configuration in Envoy).
struct Live1 {
    filter: Filter,
    endpoint: Endpoint,
    host: FakeConfig,
}

fn live_one() -> Live1 {
    let text = json!({
        "credential": {"prefixes": ["sk_live_"]},
        "routes": [{"path": "/v1/**", "scopes": ["venues:read"]}],
        "key_set": {"cluster": "keyset", "path": "/props-answers/manifest.json", "poll_interval_ms": 100,
                    "max_manifest_bytes": 4096, "max_shard_bytes": 1024}
    });
    let mut host = FakeConfig::default();
    let filter = configure(b"keygate", text.to_string().as_bytes(), &mut host).unwrap();
    Live1 { filter, endpoint: Endpoint::default(), host }
}

/// The bytes an answer carries for the document at `path`.
fn body_for(body: &Body, path: &str, digits: usize, revoked: bool) -> Vec<u8> {
    let asked = |revoked: bool| {
        let layout = key_layout(revoked, digits);
        if path.ends_with("manifest.json") {
            layout.manifest()
        } else {
            layout.shards.iter().find(|s| path.ends_with(&s.path)).map(|s| s.body.clone()).unwrap_or_default()
        }
    };
    match body {
        Body::Asked => asked(revoked),
        Body::Other => asked(!revoked),
        Body::Truncated { at } => {
            let mut bytes = asked(revoked);
            bytes.truncate(at % (bytes.len() + 1));
            bytes
        }
        Body::Flipped { at, bits } => {
            let mut bytes = asked(revoked);
            let len = bytes.len();
            if let Some(b) = bytes.get_mut(at % len.max(1)) {
                *b ^= bits;
            }
            bytes
        }
        Body::Garbage(bytes) => bytes.clone(),
        Body::Huge => vec![b' '; 5000],
    }
}

proptest! {
    // Fewer cases than the default 256: each drives a sync through up to 48 events.
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    /// Two configurations of one live key set, driven by ticks, answers of any status, ETag, body
    /// (the documents asked for, cut, flipped, garbage, past the limit) and announced size, stray
    /// answers, refused callouts, a configuration destroyed with its callouts out, and requests in
    /// between: no panic; a key no layout holds is never forwarded; the live key only once a body
    /// with its valid record was delivered, and never before a set loaded (503).
    #[test]
    fn callout_answers_of_any_kind_in_any_order_never_forward_a_key_the_set_does_not_hold(
        digits in prop::sample::select(vec![0usize, 0, 1]),
        events in prop::collection::vec(event(), 1..48),
    ) {
        let mut live: [Option<Live1>; 2] = [Some(live_one()), Some(live_one())];
        let mut revoked = false;
        let mut served_valid = false;
        let mut served_any = false;
        for event in events {
            let to = match &event {
                Event::Tick(to) | Event::Refuse(to, _) | Event::Destroy(to) => *to,
                Event::Answer { to, .. } | Event::Stray { to, .. } | Event::Request { to, .. } => *to,
                Event::Publish(now_revoked) => {
                    revoked = *now_revoked;
                    continue;
                }
            };
            if let Event::Destroy(_) = event {
                live[to] = None;
                continue;
            }
            let one = live[to].get_or_insert_with(live_one);
            match event {
                Event::Tick(_) => one.filter.on_tick(&one.endpoint, &mut one.host),
                Event::Refuse(_, refuse) => one.endpoint.refuse.set(refuse),
                Event::Answer { pick, succeeded, status, etag, body, size, split, .. } => {
                    let asked = one.endpoint.asked.borrow().len();
                    if asked == 0 {
                        continue;
                    }
                    let (token, path) = one.endpoint.asked.borrow_mut().remove(pick % asked);
                    let bytes = body_for(&body, &path, digits, revoked);
                    let code = status.to_string();
                    let mut headers: Vec<(&[u8], &[u8])> = vec![(b":status", code.as_bytes())];
                    if let Some(etag) = &etag {
                        headers.push((b"etag", etag.as_bytes()));
                    }
                    let at = split % (bytes.len() + 1);
                    let answer = crate::live::CalloutAnswer::new(succeeded, &headers, vec![&bytes[..at], &bytes[at..]]);
                    let announced = match size {
                        Announced::Actual => answer.body_size(),
                        Announced::Zero => 0,
                        Announced::More(n) => answer.body_size() + n,
                        Announced::Most => usize::MAX,
                    };
                    if succeeded && status == 200 {
                        served_any = true;
                        served_valid |= String::from_utf8_lossy(&bytes).contains(&valid_record());
                    }
                    one.filter.on_answer(u64::from(token), &answer, announced, &one.endpoint, &mut one.host);
                }
                Event::Stray { token, status, .. } => {
                    let code = status.to_string();
                    let headers: Vec<(&[u8], &[u8])> = vec![(b":status", code.as_bytes())];
                    let answer = crate::live::CalloutAnswer::new(true, &headers, vec![b"{}"]);
                    let owned = one.endpoint.asked.borrow().iter().any(|(t, _)| u64::from(*t) == token);
                    if !owned {
                        one.filter.on_answer(token, &answer, 2, &one.endpoint, &mut one.host);
                    }
                }
                Event::Request { stranger, .. } => {
                    let key = if stranger { STRANGER } else { KEY };
                    let (verdict, status) = call_get(&one.filter, "/v1/x", Some(key))?;
                    if stranger {
                        prop_assert_eq!(verdict, Verdict::Stop, "a key no layout holds was forwarded");
                    }
                    if verdict == Verdict::Continue {
                        prop_assert!(served_valid, "the live key was forwarded before its valid record was served");
                    }
                    if !served_any {
                        prop_assert_eq!(status, Some(503), "before any set loaded");
                    }
                }
                Event::Destroy(_) | Event::Publish(_) => unreachable!(),
            }
        }
    }
}
