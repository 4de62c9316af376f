//! The proxy-wasm glue: the root context reads the configuration and forwards its ticks and the
//! key-set endpoint's answers to keygate-core's sync; each request gathers its headers in one host
//! call, asks [`Policy::decide`], and carries the decision out; an allowed request's trailers lose
//! what [`Policy::trailers_to_remove`] names.
//!
//! Host calls are made through `proxy_wasm::hostcalls` (here, in [`crate::host`] and
//! [`crate::metrics`]), whose results are handled, rather than through the SDK's trait defaults,
//! which unwrap them.

use crate::host::{monotonic_ms, now_ms, CallAnswer, Envoy, VM_NUMBER};
use crate::metrics::{Metrics, Report};
use keygate_core::keys::{KeyHash, KeySource, Lookup};
use keygate_core::live::{Host, LiveSet, Syncer};
use keygate_core::plugin::Plugin;
use keygate_core::policy::{Decision, Policy, RequestView};
use keygate_core::reply::internal_error_body;
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::rc::Rc;
use std::time::Duration;

/// The host calls of the key-set sync.
const HOST: Host<'static> = Host { store: &Envoy, fetch: &Envoy, clock: &Envoy };

/// What every request context shares: the compiled policy, the live key set and the metric ids.
struct Shared {
    policy: Policy,
    /// The live key set, if one is configured.
    live: Option<LiveSet>,
    metrics: Metrics,
}

impl Shared {
    fn report(&self) -> Report<'_> {
        Report { metrics: &self.metrics, inline_keys: self.policy.keys.len() as u64 }
    }
}

/// Keys for one request: the inline set first, then this key's own record in shared data.
struct Keys<'a>(&'a Shared);

impl KeySource for Keys<'_> {
    fn lookup(&self, hash: &KeyHash) -> Lookup<'_> {
        let shared = self.0;
        if let found @ Lookup::Found(_) = shared.policy.keys.lookup(hash) {
            return found;
        }
        let Some(live) = &shared.live else { return Lookup::NotFound };
        match live.find(&Envoy, hash) {
            Ok(lookup) => lookup,
            Err(e) => {
                error!("keygate: cannot read the key set: {}", e.status);
                Lookup::Unavailable
            }
        }
    }
}

/// The plugin's root context: compiles the configuration, hands it to each request, and keeps the
/// live key set fresh when one is configured.
#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    /// This VM's part in keeping the live key set.
    sync: Option<Syncer>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        let Some(shared) = self.shared.clone() else { return };
        let (Some(live), Some(sync)) = (&shared.live, self.sync.as_mut()) else { return };
        // The answer is read lazily: the sync checks the token and the size before any body is
        // copied into the VM.
        let answer = CallAnswer::new(body_size);
        sync.on_answer(&HOST, live, &shared.policy.keys, token, body_size, &answer, &mut shared.report());
    }
}

/// Follows Envoy's log level for the `wasm` component, so that a `debug!` below it costs a comparison,
/// not a formatted message sent to the host and dropped there.
fn follow_envoy_log_level() {
    if let Ok(level) = hostcalls::get_log_level() {
        proxy_wasm::set_log_level(level);
    }
}

/// How often a VM without a live key set wakes, to follow Envoy's log level.
const IDLE_TICK: Duration = Duration::from_secs(5);

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        follow_envoy_log_level();
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("keygate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        // `usage` reporting is compiled by the core but not served by this host yet.
        let Plugin { policy, key_set, usage: _ } = match Plugin::from_json(&text) {
            Ok(plugin) => plugin,
            Err(e) => {
                error!("keygate: invalid configuration: {e}");
                return false;
            }
        };
        let metrics = Metrics::define(key_set.is_some());
        Metrics::record(metrics.keys, policy.keys.len() as u64);
        info!("keygate: configured with {} inline keys, {} routes", policy.keys.len(), policy.routes.len());
        self.sync = None;
        if key_set.is_none() {
            if let Err(status) = hostcalls::set_tick_period(IDLE_TICK) {
                warn!("keygate: cannot set the tick period: {status:?}");
            }
        }
        if let Some(config) = &key_set {
            let me = match VM_NUMBER.with(|n| n.get(&Envoy, config)) {
                Ok(me) => me,
                Err(reason) => {
                    error!("keygate: cannot number this VM in shared data: {reason}");
                    return false;
                }
            };
            if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(config.tick_ms())) {
                error!("keygate: cannot set the tick period: {status:?}");
                return false;
            }
            self.sync = Some(Syncer::new(me, monotonic_ms().unwrap_or_default()));
        }
        self.shared = Some(Rc::new(Shared { policy, live: key_set.map(LiveSet::new), metrics }));
        true
    }

    fn on_tick(&mut self) {
        follow_envoy_log_level();
        let Some(shared) = self.shared.clone() else { return };
        let (Some(live), Some(sync)) = (&shared.live, self.sync.as_mut()) else { return };
        sync.on_tick(&HOST, live, &mut shared.report());
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { shared: self.shared.clone(), allowed: false }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct Request {
    shared: Option<Rc<Shared>>,
    /// Whether the request headers were allowed (and edited): only then may the trailers go on.
    allowed: bool,
}

impl Context for Request {}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let Some(shared) = self.shared.clone() else {
            // Never configured: refuse rather than let anything through.
            return send_internal_error("keygate is not configured");
        };
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(status) => {
                error!("keygate: cannot read request headers: {status:?}");
                return send_internal_error("request headers unreadable");
            }
        };
        #[cfg(feature = "panic-probe")]
        if headers.iter().any(|(n, _)| n == "x-keygate-panic-probe") {
            // Test builds only: crash the VM the way a panic does (panic = "abort"), to prove that
            // Envoy's failure_policy never lets the request through.
            std::process::abort();
        }
        #[cfg(feature = "panic-probe")]
        for (_, value) in headers.iter().filter(|(n, _)| n == "x-keygate-probe-shared") {
            // Test builds only: write `<entry> <value in hex>` into shared data, so a test can plant
            // what another clock (or a bug) would have left there.
            let text = String::from_utf8_lossy(value);
            if let Some((entry, value)) = text.split_once(' ').and_then(|(e, v)| Some((e, hex::decode(v).ok()?))) {
                if let Err(status) = hostcalls::set_shared_data(entry, Some(&value), None) {
                    error!("keygate: probe cannot write {entry}: {status:?}");
                }
            }
        }
        let request = RequestView::from_headers(&headers);
        match shared.policy.decide(&Keys(&shared), &request, &now_ms) {
            Decision::Allow { edits, key_id } => {
                for name in &edits.remove {
                    if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name.as_ref()) {
                        error!("keygate: cannot remove header {name}: {status:?}");
                        return send_internal_error("header edit failed");
                    }
                }
                for (name, value) in &edits.set {
                    if let Err(status) = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)) {
                        error!("keygate: cannot set header {name}: {status:?}");
                        return send_internal_error("header edit failed");
                    }
                }
                if let Some(id) = key_id {
                    debug!("keygate: allowed key {id}");
                }
                Metrics::bump(shared.metrics.allowed);
                self.allowed = true;
                Action::Continue
            }
            Decision::Deny(denial) => {
                let reply = shared.policy.reply(&denial, &request);
                debug!("{}", denial.log_line());
                Metrics::bump(shared.metrics.denied.get(denial.kind.index()).copied().flatten());
                let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
                if let Err(status) =
                    hostcalls::send_http_response(u32::from(reply.status), headers, Some(reply.body.as_bytes()))
                {
                    error!("keygate: cannot send the {} reply: {status:?}", reply.status);
                }
                Action::Pause
            }
        }
    }

    /// Trailers arrive after the decision: every one named like a header keygate reads or sets is
    /// removed ([`Policy::trailers_to_remove`]), so that an upstream that merges trailers into the
    /// headers finds no key and no identity keygate did not check or set.
    fn on_http_request_trailers(&mut self, _num_trailers: usize) -> Action {
        // A refused request was answered already and Envoy forwards nothing more of it; never
        // let trailers resume a request keygate did not allow.
        let Some(shared) = self.shared.clone().filter(|_| self.allowed) else { return Action::Pause };
        let trailers = match hostcalls::get_map_bytes(MapType::HttpRequestTrailers) {
            Ok(t) => t,
            Err(status) => {
                error!("keygate: cannot read request trailers: {status:?}");
                return send_internal_error("request trailers unreadable");
            }
        };
        for name in shared.policy.trailers_to_remove(&trailers) {
            if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestTrailers, name) {
                error!("keygate: cannot remove trailer {name}: {status:?}");
                return send_internal_error("trailer edit failed");
            }
        }
        Action::Continue
    }
}

/// Refuses the request with a 500 when keygate cannot do its job: failing closed.
fn send_internal_error(reason: &str) -> Action {
    let body = internal_error_body(reason);
    let headers = vec![("content-type", "application/json")];
    if let Err(status) = hostcalls::send_http_response(500, headers, Some(body.as_bytes())) {
        error!("keygate: cannot send the 500 reply: {status:?}");
    }
    Action::Pause
}
