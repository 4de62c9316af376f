//! The fuzz entry point of the module's safe half (`fuzz/fuzz_targets/native.rs`, which compiles
//! this file with [`crate::filter`] and [`crate::live`] as its own modules, without the FFI), and
//! of the unit test that replays the inputs it saved (`fuzz/regressions/native/`). It must return
//! normally for every input: a panic is a finding, whether a defect panicked or a check below
//! found the hooks doing what they must not.
//!
//! The first byte picks what the rest drives: a configuration (the text as given); a stream's
//! hooks (request headers, then trailers or more headers, with host calls failing from some
//! point on); or a live key set's sync (ticks, callout answers of any status, headers and body,
//! stray answers, requests). Inputs are blocks separated by a NUL byte; in a block of headers each
//! line is `name:value`, both any bytes.

use crate::filter::{configure, ConfigHost, Filter, Level, Log, Request, Stream, Unreadable, Verdict};
use crate::live::CalloutAnswer;
use keygate_core::keys::hash_key;
use keygate_core::live::Fetch;
use std::cell::{Cell, RefCell};
use std::sync::OnceLock;

/// A key of the inline configuration, and one no configuration or layout here holds.
const KEY: &str = "sk_live_0000aaaa_1111111111111111111111111111111111111111111111111111111111111111";
const STRANGER: &str = "sk_live_0000ffff_7777777777777777777777777777777777777777777777777777777777777777";

/// Runs one fuzz input.
pub fn native(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => configuration(rest),
        1 => hooks(rest),
        _ => sync(rest),
    }
}

/// A host that numbers stats (or refuses them) and forgets log lines but their level.
#[derive(Default)]
struct Host {
    stats: usize,
    refuse_stats: bool,
    errors: Cell<usize>,
}

impl Log for Host {
    fn enabled(&self, _: Level) -> bool {
        true
    }
    fn log(&self, level: Level, _: &str) {
        if level == Level::Error {
            self.errors.set(self.errors.get() + 1);
        }
    }
}

impl ConfigHost for Host {
    fn define_counter(&mut self, _: &str) -> Option<usize> {
        self.stats += 1;
        (!self.refuse_stats).then_some(self.stats)
    }
    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        self.define_counter(name)
    }
    fn set_gauge(&mut self, _: usize, _: u64) {}
    fn increment_counter(&mut self, _: usize) {}
}

/// An endpoint that hands out tokens for every callout, or refuses them.
#[derive(Default)]
struct Endpoint {
    asked: RefCell<Vec<u32>>,
    next: Cell<u32>,
    refuse: Cell<bool>,
}

impl Fetch for Endpoint {
    fn get(&self, _: &str, _: &[(&str, &str)], _: u64) -> Result<u32, String> {
        if self.refuse.get() {
            return Err("callout refused".into());
        }
        self.next.set(self.next.get().wrapping_add(1));
        self.asked.borrow_mut().push(self.next.get());
        Ok(self.next.get())
    }
}

/// A stream whose maps hold any bytes, read as the FFI reads them; from its `fail_from`-th
/// mutating call on, every one fails.
#[derive(Default)]
struct Fake {
    headers: Vec<(Vec<u8>, Vec<u8>)>,
    trailers: Vec<(Vec<u8>, Vec<u8>)>,
    fail_from: Option<usize>,
    calls: usize,
    replies: Vec<u16>,
}

impl Fake {
    fn call(&mut self) -> bool {
        self.calls += 1;
        self.fail_from.is_none_or(|n| self.calls <= n)
    }
}

fn owned(map: &[(Vec<u8>, Vec<u8>)]) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
    crate::filter::owned_headers(map.iter().map(|(n, v)| (n.as_slice(), v.as_slice())))
}

fn remove(map: &mut Vec<(Vec<u8>, Vec<u8>)>, name: &str) {
    map.retain(|(n, _)| !n.eq_ignore_ascii_case(name.as_bytes()));
}

impl Log for Fake {
    fn enabled(&self, _: Level) -> bool {
        true
    }
    fn log(&self, _: Level, _: &str) {}
}

impl Stream for Fake {
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        owned(&self.headers)
    }
    fn remove_request_header(&mut self, name: &str) -> bool {
        let done = self.call();
        if done {
            remove(&mut self.headers, name);
        }
        done
    }
    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        owned(&self.trailers)
    }
    fn remove_request_trailer(&mut self, name: &str) -> bool {
        let done = self.call();
        if done {
            remove(&mut self.trailers, name);
        }
        done
    }
    fn set_request_header(&mut self, name: &str, value: &str) -> bool {
        assert!(!value.is_empty(), "an empty value set, which Envoy 1.40 turns into a removal");
        let done = self.call();
        if done {
            remove(&mut self.headers, name);
            self.headers.push((name.as_bytes().to_vec(), value.as_bytes().to_vec()));
        }
        done
    }
    fn send_response(&mut self, status: u16, _: &[(&str, &str)], _: &str) {
        self.replies.push(status);
    }
    fn increment_counter(&mut self, _: usize) {}
}

/// `name:value` lines (a line without a colon is a name with an empty value).
fn lines(block: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
    block
        .split(|&c| c == b'\n')
        .filter(|line| !line.is_empty())
        .map(|line| match line.iter().skip(1).position(|&c| c == b':') {
            Some(at) => (line.get(..=at).unwrap_or_default().to_vec(), line.get(at + 2..).unwrap_or_default().to_vec()),
            None => (line.to_vec(), Vec::new()),
        })
        .collect()
}

/// The configuration the hooks run with: two keys, a public route, a bound route, every identity
/// header.
fn inline() -> &'static Option<Filter> {
    static FILTER: OnceLock<Option<Filter>> = OnceLock::new();
    FILTER.get_or_init(|| {
        let hash = hex::encode(hash_key(KEY.as_bytes()));
        let text = format!(
            r#"{{"credential": {{"headers": ["authorization", "x-api-key"], "prefixes": ["sk_live_"]}},
               "keys": [{{"id": "0000aaaa", "hash": "{hash}", "org": "org_42", "scopes": ["venues:read"],
                          "attributes": {{"venue": "v_7"}}}}],
               "routes": [{{"path": "/healthz", "public": true}},
                          {{"path": "/v1/venues/{{venue_id}}/**", "scopes": ["venues:read"], "bind": {{"venue_id": "venue"}}}}],
               "upstream": {{"attribute_headers": {{"venue": "x-venue-id"}}}}}}"#
        );
        configure(b"keygate", text.as_bytes(), &mut Host::default())
    })
}

/// A configuration from the input: refused or not, never a panic; one that is accepted serves a
/// request and ticks.
fn configuration(text: &[u8]) {
    let mut host = Host { refuse_stats: text.first().is_some_and(|c| c & 1 == 1), ..Host::default() };
    let Some(filter) = configure(b"keygate", text, &mut host) else {
        assert!(host.errors.get() > 0, "a configuration refused without an error logged");
        return;
    };
    let mut stream = Fake {
        headers: lines(format!(":method:GET\n:path:/v1/x\nauthorization:Bearer {KEY}").as_bytes()),
        ..Fake::default()
    };
    let verdict = Request::default().on_headers(Some(&filter), &mut stream);
    assert_eq!(stream.replies.len(), usize::from(verdict == Verdict::Stop));
    if filter.tick().is_some() {
        let endpoint = Endpoint::default();
        filter.on_tick(&endpoint, &mut host);
        filter.on_tick(&endpoint, &mut host);
    }
}

/// A stream's hooks: the headers (first block), then per block `T` trailers, `H` the headers hook
/// again, or `F<n>` host calls failing from the n-th on.
fn hooks(data: &[u8]) {
    let Some(filter) = inline() else { return };
    let mut blocks = data.split(|&c| c == 0);
    let mut stream = Fake { headers: lines(blocks.next().unwrap_or_default()), ..Fake::default() };
    let request = Request::default();
    let mut verdict: Option<Verdict> = None;
    let check_headers = |stream: &mut Fake, verdict: &mut Option<Verdict>| {
        let before = stream.replies.len();
        let now = request.on_headers(Some(filter), stream);
        match (*verdict, now) {
            (Some(Verdict::Stop), _) => {
                assert_eq!(now, Verdict::Stop, "a refused request resumed");
                assert_eq!(stream.replies.len(), before, "a second reply");
            }
            (_, Verdict::Continue) => assert_eq!(stream.replies.len(), before, "a reply, and the request forwarded"),
            (_, Verdict::Stop) => assert_eq!(stream.replies.len(), before + 1, "refused without a reply"),
        }
        if now == Verdict::Continue {
            // What goes upstream carries no copy of a credential header with the key.
            for (name, value) in &stream.headers {
                let credential = name.eq_ignore_ascii_case(b"authorization") || name.eq_ignore_ascii_case(b"x-api-key");
                assert!(!(credential && value.windows(KEY.len()).any(|w| w == KEY.as_bytes())), "the key forwarded");
            }
        }
        *verdict = Some(now);
    };
    check_headers(&mut stream, &mut verdict);
    for block in blocks {
        match block.split_first() {
            Some((b'T', rest)) => {
                stream.trailers = lines(rest);
                let before = stream.replies.len();
                let now = request.on_trailers(Some(filter), &mut stream);
                if now == Verdict::Continue {
                    assert_eq!(verdict, Some(Verdict::Continue), "trailers resumed a request keygate did not allow");
                    assert_eq!(stream.replies.len(), before);
                    let left = owned(&stream.trailers).unwrap_or_default();
                    assert!(filter.policy().trailers_to_remove(&left).is_empty(), "a guarded trailer went on");
                } else {
                    let sent = stream.replies.len() - before;
                    assert_eq!(sent, usize::from(verdict != Some(Verdict::Stop)), "replies: {sent}");
                    verdict = Some(Verdict::Stop);
                }
            }
            Some((b'H', _)) => check_headers(&mut stream, &mut verdict),
            Some((b'F', rest)) => stream.fail_from = rest.first().map(|&n| stream.calls + usize::from(n % 8)),
            _ => {}
        }
    }
}

/// A live key set's sync: per block `T` a tick, `A<status>\n<body>` the answer to the oldest
/// callout out, `S` a stray answer, `X` callouts refused (again accepted on the next `X`), `K` /
/// `U` a request with a key no layout here holds / with the key whose hash the bodies may name.
fn sync(data: &[u8]) {
    let text = r#"{"credential": {"prefixes": ["sk_live_"]}, "routes": [{"path": "/v1/**"}],
                   "key_set": {"cluster": "keyset", "path": "/fuzz/manifest.json", "poll_interval_ms": 100,
                               "max_manifest_bytes": 4096, "max_shard_bytes": 4096}}"#;
    let mut host = Host::default();
    let Some(filter) = configure(b"keygate", text.as_bytes(), &mut host) else { return };
    let endpoint = Endpoint::default();
    filter.on_tick(&endpoint, &mut host);
    filter.on_tick(&endpoint, &mut host);
    // Every body delivered: a key is only forwarded once one of them named its hash.
    let mut delivered: Vec<u8> = Vec::new();
    for block in data.split(|&c| c == 0) {
        match block.split_first() {
            Some((b'T', _)) => filter.on_tick(&endpoint, &mut host),
            Some((b'A', rest)) => {
                let mut asked = endpoint.asked.borrow_mut();
                if asked.is_empty() {
                    continue;
                }
                let token = asked.remove(0);
                drop(asked);
                let (status, body) = match rest.iter().position(|&c| c == b'\n') {
                    Some(at) => (rest.get(..at).unwrap_or_default(), rest.get(at + 1..).unwrap_or_default()),
                    None => (rest, &[][..]),
                };
                let headers: Vec<(&[u8], &[u8])> = vec![(b":status", status), (b"etag", b"\"e\"")];
                let half = body.len() / 2;
                let answer = CalloutAnswer::new(
                    true,
                    &headers,
                    vec![body.get(..half).unwrap_or_default(), body.get(half..).unwrap_or_default()],
                );
                delivered.extend_from_slice(body);
                filter.on_answer(u64::from(token), &answer, answer.body_size(), &endpoint, &mut host);
            }
            Some((b'S', rest)) => {
                let token = rest.iter().fold(0u64, |n, &c| n.wrapping_mul(31).wrapping_add(u64::from(c)));
                if !endpoint.asked.borrow().iter().any(|&t| u64::from(t) == token) {
                    let headers: Vec<(&[u8], &[u8])> = vec![(b":status", b"200")];
                    let answer = CalloutAnswer::new(true, &headers, vec![rest]);
                    filter.on_answer(token, &answer, rest.len(), &endpoint, &mut host);
                }
            }
            Some((b'X', _)) => endpoint.refuse.set(!endpoint.refuse.get()),
            Some((op @ (b'K' | b'U'), _)) => {
                let key = if *op == b'K' { STRANGER } else { KEY };
                let auth = format!("authorization:Bearer {key}");
                let mut stream =
                    Fake { headers: lines(format!(":method:GET\n:path:/v1/x\n{auth}").as_bytes()), ..Fake::default() };
                let verdict = Request::default().on_headers(Some(&filter), &mut stream);
                assert_eq!(stream.replies.len(), usize::from(verdict == Verdict::Stop));
                if verdict == Verdict::Continue {
                    let hash = hex::encode(hash_key(key.as_bytes()));
                    let named = delivered.windows(hash.len()).any(|w| w.eq_ignore_ascii_case(hash.as_bytes()));
                    assert!(named, "a key forwarded that no delivered body named");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::{Duration, Instant};

    /// Replays every input saved under fuzz/regressions/native/ (crashes the fuzzer found, and
    /// seeds), each within `make fuzz`'s per-input budget (2 s) for an unoptimised build.
    #[test]
    fn saved_native_inputs_do_not_panic() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regressions/native");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let start = Instant::now();
            assert!(std::panic::catch_unwind(|| super::native(&data)).is_ok(), "fuzz input {} panics", path.display());
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "fuzz input {} took {:?}",
                path.display(),
                start.elapsed()
            );
            count += 1;
        }
        assert!(count >= 3, "the seeds are missing from {}", dir.display());
    }
}
