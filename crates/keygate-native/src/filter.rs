//! The module's safe half: what the configuration hook and the request hooks do, written
//! against two small traits ([`ConfigHost`], [`Stream`]) that [`crate::ffi`] implements with Envoy's
//! callbacks and the tests implement with a recording fake. It mirrors `keygate-wasm`'s
//! `filter.rs` on the request path: gather every header at once, ask [`Policy::decide`], apply the
//! edits or send the rendered reply, bump one counter; then remove from an allowed request's
//! trailers what [`Policy::trailers_to_remove`] names.

use crate::live::Live;
use crate::usage::Usage;
use keygate_core::keys::{KeyHash, KeySource, Lookup};
use keygate_core::live::{Answer, Fetch};
use keygate_core::plugin::Plugin;
use keygate_core::policy::{Decision, Policy, RequestView};
use keygate_core::reply::{internal_error_body, DenyKind};
use keygate_core::usage::{Outcome, Post};
use std::cell::Cell;
use std::time::{SystemTime, UNIX_EPOCH};

/// The only filter this module serves (`filter_name` in Envoy's `DynamicModuleFilter`).
pub const FILTER_NAME: &str = "keygate";

/// Log levels, in Envoy's order (the ABI's `envoy_dynamic_module_type_log_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Debug,
    Info,
    Warn,
    Error,
}

/// Logging, the one host service both hooks use.
pub trait Log {
    /// Whether a message at `level` would be written; checked before a debug line is formatted.
    fn enabled(&self, level: Level) -> bool;
    fn log(&self, level: Level, message: &str);
}

/// What the configuration hook needs from Envoy: stats are defined while the configuration is
/// created (Envoy refuses new stats afterwards).
pub trait ConfigHost: Log {
    /// A counter's id, `None` if Envoy refused to define it.
    fn define_counter(&mut self, name: &str) -> Option<usize>;
    /// A gauge's id, `None` if Envoy refused to define it.
    fn define_gauge(&mut self, name: &str) -> Option<usize>;
    fn set_gauge(&mut self, id: usize, value: u64);
    /// Counts on a configuration's counter, from the main thread (the key-set sync's stats).
    fn increment_counter(&mut self, id: usize);
    /// Adds `n` to a configuration's counter (usage reporting's dropped requests).
    fn add_counter(&mut self, id: usize, n: u64) {
        for _ in 0..n {
            self.increment_counter(id);
        }
    }
}

/// Why the request headers could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreadable {
    /// Envoy answered that it has no request headers.
    Host,
    /// A header name is not UTF-8 (Envoy's codecs never let one through).
    NameNotUtf8,
}

/// What the request hooks (headers, trailers) need from Envoy for one stream. Every mutating call
/// reports whether Envoy carried it out.
pub trait Stream: Log {
    /// Every request header, pseudo-headers included, in Envoy's order.
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable>;
    /// Removes every value of a request header.
    fn remove_request_header(&mut self, name: &str) -> bool;
    /// Every request trailer, in Envoy's order (during the trailers hook).
    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable>;
    /// Removes every value of a request trailer.
    fn remove_request_trailer(&mut self, name: &str) -> bool;
    /// Replaces every value of a request header with one value, which is not empty.
    fn set_request_header(&mut self, name: &str, value: &str) -> bool;
    /// Answers the request locally; nothing goes upstream.
    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str);
    fn increment_counter(&mut self, id: usize);
}

/// What the hook returns to Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Let the request go on to the next filter.
    Continue,
    /// A reply was sent (or could not be): the request goes no further.
    Stop,
}

/// The stats of one configuration, as Envoy numbered them.
#[derive(Debug, Default)]
struct Metrics {
    allowed: Option<usize>,
    /// One per [`DenyKind`], in [`DenyKind::ALL`] order.
    denied: Vec<Option<usize>>,
}

/// One compiled configuration, shared (read-only) by every stream on every worker thread.
#[derive(Debug)]
pub struct Filter {
    policy: Policy,
    metrics: Metrics,
    /// The live key set, if one is configured.
    live: Option<Live>,
    /// Usage reporting, if it is configured.
    usage: Option<Usage>,
}

/// Keys for one request: the inline set first, then this key's record in the process's store.
struct Keys<'a> {
    filter: &'a Filter,
    log: &'a dyn Log,
}

impl KeySource for Keys<'_> {
    fn lookup(&self, hash: &KeyHash) -> Lookup<'_> {
        if let found @ Lookup::Found(_) = self.filter.policy.keys.lookup(hash) {
            return found;
        }
        match &self.filter.live {
            Some(live) => live.lookup(hash, self.log),
            None => Lookup::NotFound,
        }
    }
}

/// Compiles the filter configuration Envoy hands over (`filter_config`; a
/// `google.protobuf.StringValue` arrives as its string). `None` makes Envoy refuse the
/// configuration; the reason has been logged at error level, naming the field.
pub fn configure(filter_name: &[u8], text: &[u8], host: &mut dyn ConfigHost) -> Option<Filter> {
    if filter_name != FILTER_NAME.as_bytes() {
        let name = String::from_utf8_lossy(filter_name);
        host.log(
            Level::Error,
            &format!("keygate: unknown filter_name {name:?}: this module has one filter, {FILTER_NAME:?}"),
        );
        return None;
    }
    let Plugin { policy, key_set, usage } = match Plugin::from_json(text) {
        Ok(plugin) => plugin,
        Err(e) => {
            host.log(Level::Error, &format!("keygate: invalid configuration: {e}"));
            return None;
        }
    };
    let counter = |host: &mut dyn ConfigHost, name: &str| {
        let id = host.define_counter(name);
        if id.is_none() {
            host.log(Level::Warn, &format!("keygate: cannot define counter {name}"));
        }
        id
    };
    let allowed = counter(host, "keygate.allowed");
    let denied = DenyKind::ALL.iter().map(|k| counter(host, &format!("keygate.denied.{}", k.name()))).collect();
    let all_keys = host.define_gauge("keygate.keys");
    match all_keys {
        Some(id) => host.set_gauge(id, policy.keys.len() as u64),
        None => host.log(Level::Warn, "keygate: cannot define gauge keygate.keys"),
    }
    let live = match key_set {
        Some(config) => Some(Live::new(config, policy.keys.len() as u64, all_keys, host)?),
        None => None,
    };
    let usage = match usage {
        Some(config) => Some(Usage::new(&config, host)?),
        None => None,
    };
    host.log(
        Level::Info,
        &format!(
            "keygate: configured with {} inline keys, {} routes{}{}",
            policy.keys.len(),
            policy.routes.len(),
            if live.is_some() { ", a live key set" } else { "" },
            if usage.is_some() { ", usage reporting" } else { "" }
        ),
    );
    Some(Filter { policy, metrics: Metrics { allowed, denied }, live, usage })
}

/// The current time in Unix milliseconds, asked only for a key with an expiry.
fn now_ms() -> Option<i64> {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

impl Filter {
    /// The compiled policy (for the fuzz target's checks).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// How often the live key set's sync and usage reporting want a tick (the shorter);
    /// `None` without either.
    pub fn tick(&self) -> Option<std::time::Duration> {
        self.live.as_ref().map(Live::tick).into_iter().chain(self.usage.as_ref().map(Usage::tick)).min()
    }

    /// A tick of usage reporting, on the main thread.
    pub fn on_usage_tick(&self, post: &dyn Post, host: &mut dyn ConfigHost) {
        if let Some(usage) = &self.usage {
            usage.on_tick(post, host);
        }
    }

    /// An answer to this configuration's callout `callout`, on the main thread: whether it was a
    /// usage report's (then it is not the key-set sync's).
    pub fn on_usage_answer(&self, callout: u64, answer: &dyn Answer, host: &mut dyn ConfigHost) -> bool {
        self.usage.as_ref().is_some_and(|usage| usage.on_answer(callout, answer, host))
    }

    /// A tick of the live key set's sync, on the main thread.
    pub fn on_tick(&self, fetch: &dyn Fetch, host: &mut dyn ConfigHost) {
        if let Some(live) = &self.live {
            live.on_tick(fetch, host);
        }
    }

    /// An answer of the key-set endpoint, on the main thread.
    pub fn on_answer(
        &self,
        token: u64,
        answer: &dyn Answer,
        body_size: usize,
        fetch: &dyn Fetch,
        host: &mut dyn ConfigHost,
    ) {
        if let Some(live) = &self.live {
            live.on_answer(token, answer, body_size, &self.policy.keys, fetch, host);
        }
    }

    /// Decides one request from its headers and carries the decision out.
    pub fn on_request_headers(&self, stream: &mut dyn Stream) -> Verdict {
        let headers = match stream.request_headers() {
            Ok(headers) => headers,
            Err(why) => {
                stream.log(Level::Error, &format!("keygate: cannot read request headers: {why:?}"));
                return refuse(stream, "request headers unreadable");
            }
        };
        #[cfg(feature = "panic-probe")]
        if headers.iter().any(|(n, _)| n == "x-keygate-panic-probe") {
            // Test builds only: a defect on the request path, which `guarded` must turn into a
            // refused request.
            #[allow(clippy::panic)] // the point of the probe
            {
                panic!("keygate: panic probe");
            }
        }
        let request = RequestView::from_headers(&headers);
        let keys = Keys { filter: self, log: &*stream };
        let decision = self.policy.decide(&keys, &request, &now_ms);
        if let Some(usage) = &self.usage {
            usage.record(Outcome::of(&decision));
        }
        match decision {
            Decision::Allow { edits, key_id } => {
                for name in &edits.remove {
                    if !stream.remove_request_header(name) {
                        stream.log(Level::Error, &format!("keygate: cannot remove header {name}"));
                        return refuse(stream, "header edit failed");
                    }
                }
                for (name, value) in &edits.set {
                    // Envoy 1.40's ABI cannot set an empty value (`http_set_header` removes the
                    // header then, `http_add_header` refuses): the header is removed, so no copy a
                    // client sent survives, where the wasm filter sends it empty.
                    let done = if value.is_empty() {
                        stream.remove_request_header(name)
                    } else {
                        stream.set_request_header(name, value)
                    };
                    if !done {
                        stream.log(Level::Error, &format!("keygate: cannot set header {name}"));
                        return refuse(stream, "header edit failed");
                    }
                }
                if let Some(id) = key_id {
                    if stream.enabled(Level::Debug) {
                        stream.log(Level::Debug, &format!("keygate: allowed key {id}"));
                    }
                }
                if let Some(id) = self.metrics.allowed {
                    stream.increment_counter(id);
                }
                Verdict::Continue
            }
            Decision::Deny(denial) => {
                // Nothing goes upstream, but Envoy's access log reads these headers: none may keep
                // an identity the client sent. A failed removal is logged; the refusal stands.
                for name in &denial.remove {
                    if !stream.remove_request_header(name) {
                        stream.log(Level::Error, &format!("keygate: cannot remove header {name}"));
                    }
                }
                let reply = self.policy.reply(&denial, &request);
                if stream.enabled(Level::Debug) {
                    stream.log(Level::Debug, &denial.log_line());
                }
                if let Some(id) = self.metrics.denied.get(denial.kind.index()).copied().flatten() {
                    stream.increment_counter(id);
                }
                let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                stream.send_response(reply.status, &headers, &reply.body);
                Verdict::Stop
            }
        }
    }

    /// The request trailers of a stream whose request headers got `headers` (`None`: no verdict
    /// yet). Only an allowed request's trailers go on, without every trailer
    /// [`Policy::trailers_to_remove`] names. A refused request stays stopped (its reply is sent);
    /// trailers before any verdict, or that cannot be read or edited, refuse the request with a
    /// 500: trailers never resume a request keygate did not allow.
    pub fn on_request_trailers(&self, stream: &mut dyn Stream, headers: Option<Verdict>) -> Verdict {
        match headers {
            Some(Verdict::Continue) => {}
            Some(Verdict::Stop) => return Verdict::Stop,
            None => {
                stream.log(Level::Error, "keygate: request trailers before the request headers were decided");
                return refuse(stream, "request trailers before a decision");
            }
        }
        let trailers = match stream.request_trailers() {
            Ok(trailers) => trailers,
            Err(why) => {
                stream.log(Level::Error, &format!("keygate: cannot read request trailers: {why:?}"));
                return refuse(stream, "request trailers unreadable");
            }
        };
        for name in self.policy.trailers_to_remove(&trailers) {
            if !stream.remove_request_trailer(name) {
                stream.log(Level::Error, &format!("keygate: cannot remove trailer {name}"));
                return refuse(stream, "trailer edit failed");
            }
        }
        Verdict::Continue
    }
}

/// One stream between its hooks: its verdict so far, which its trailers hook needs (trailers go
/// on only after allowed headers). `None` before the headers hook; once a hook refused the
/// request, it stays refused and no hook sends a second reply. [`crate::ffi`] keeps one per
/// stream, used by one hook at a time on the stream's worker thread, hence the `Cell`. Each hook
/// runs its body so that a panic in it refuses the request (500) instead of crossing into Envoy.
#[derive(Debug, Default)]
pub struct Request {
    verdict: Cell<Option<Verdict>>,
}

impl Request {
    /// The request-headers hook; `filter` is `None` for a stream without a configuration.
    pub fn on_headers(&self, filter: Option<&Filter>, stream: &mut dyn Stream) -> Verdict {
        if self.verdict.get() == Some(Verdict::Stop) {
            return Verdict::Stop;
        }
        let verdict = refusing_on_panic(stream, "the request path", |stream| match filter {
            Some(filter) => filter.on_request_headers(stream),
            // Never configured: refuse rather than let anything through.
            None => refuse(stream, "keygate is not configured"),
        });
        self.verdict.set(Some(verdict));
        verdict
    }

    /// The request-trailers hook ([`Filter::on_request_trailers`] with this stream's verdict).
    pub fn on_trailers(&self, filter: Option<&Filter>, stream: &mut dyn Stream) -> Verdict {
        let verdict = refusing_on_panic(stream, "the request trailers", |stream| match filter {
            Some(filter) => filter.on_request_trailers(stream, self.verdict.get()),
            None => refuse(stream, "keygate is not configured"),
        });
        if verdict == Verdict::Stop {
            self.verdict.set(Some(Verdict::Stop));
        }
        verdict
    }
}

/// Runs a stream hook's body; a panic in it (every native build unwinds, see [`crate::ffi`]) is
/// logged and refuses the request.
fn refusing_on_panic(stream: &mut dyn Stream, what: &str, body: impl FnOnce(&mut dyn Stream) -> Verdict) -> Verdict {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&mut *stream))) {
        Ok(verdict) => verdict,
        Err(_) => {
            stream.log(Level::Error, &format!("keygate: internal error on {what}"));
            refuse(stream, "internal error")
        }
    }
}

/// Refuses the request with a 500 when keygate cannot do its job: failing closed, with the wasm
/// filter's body.
pub fn refuse(stream: &mut dyn Stream, reason: &str) -> Verdict {
    let body = internal_error_body(reason);
    stream.send_response(500, &[("content-type", "application/json")], &body);
    Verdict::Stop
}

/// Envoy's header array, as borrowed name and value bytes, turned into the owned list
/// [`RequestView::from_headers`] reads. A name that is not UTF-8 makes the whole list unreadable
/// (the request is refused), as it would crash the wasm filter's SDK.
pub fn owned_headers<'a>(
    pairs: impl ExactSizeIterator<Item = (&'a [u8], &'a [u8])>,
) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
    let mut out = Vec::with_capacity(pairs.len());
    for (name, value) in pairs {
        let name = std::str::from_utf8(name).map_err(|_| Unreadable::NameNotUtf8)?;
        out.push((name.to_string(), value.to_vec()));
    }
    Ok(out)
}

/// Runs a configuration hook's body, turning a panic into `fallback` (every native build unwinds,
/// see [`crate::ffi`]; the stream hooks' bodies run in [`Request`]); the code is still written not
/// to panic.
pub fn guarded<R>(fallback: impl FnOnce() -> R, body: impl FnOnce() -> R) -> R {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or_else(|_| fallback())
}

// Every worker thread reads the same `Filter` through the pointer Envoy keeps for it.
const _: fn() = || {
    fn shared_across_threads<T: Send + Sync>() {}
    shared_across_threads::<Filter>();
};

#[cfg(test)]
#[path = "filter_tests.rs"]
mod tests;
