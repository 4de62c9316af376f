//! The proxy-wasm glue: the root context reads the configuration and forwards its ticks and the
//! answers of its HTTP calls to keygate-core's key-set sync and usage reporting ([`Worker`]); each
//! request gathers its headers in one host call, asks [`Policy::decide`], counts the decision in
//! its VM's usage tally (memory only) and carries the decision out; an allowed request's trailers
//! lose what [`Policy::trailers_to_remove`] names.
//!
//! Host calls are made through `proxy_wasm::hostcalls` (here, in [`crate::host`] and
//! [`crate::metrics`]), whose results are handled, rather than through the SDK's trait defaults,
//! which unwrap them.

use crate::host::{monotonic_ms, now_ms, wall_ms, CallAnswer, Envoy, VM_NUMBER};
use crate::metrics::{Metrics, Report, UsageLog};
use keygate_core::keys::{KeyHash, KeySource, Lookup};
use keygate_core::live::{number_vm_in, Host, LiveSet, Syncer};
use keygate_core::plugin::Plugin;
use keygate_core::policy::{Decision, Policy, RequestView};
use keygate_core::reply::internal_error_body;
use keygate_core::usage::{shared, Now, Outcome, Tally, UsageConfig, Worker};
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType};
use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

/// The host calls of the key-set sync.
const HOST: Host<'static> = Host { store: &Envoy, fetch: &Envoy, clock: &Envoy };

/// What every request context shares: the compiled policy, the live key set, the metric ids and
/// this VM's usage counts.
struct Shared {
    policy: Policy,
    /// The live key set, if one is configured.
    live: Option<LiveSet>,
    metrics: Metrics,
    /// This VM's counts since its last tick, when usage is reported.
    tally: Option<RefCell<Tally>>,
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

/// The plugin's root context: compiles the configuration, hands it to each request, keeps the live
/// key set fresh when one is configured, and hands its VM's usage counts over (or reports them for
/// the process) when usage is reported.
#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    /// This VM's part in keeping the live key set.
    sync: Option<Syncer>,
    /// This VM's part in usage reporting.
    usage: Option<Worker>,
}

fn now() -> Now {
    Now { monotonic_ms: monotonic_ms().unwrap_or_default(), wall_ms: wall_ms().unwrap_or_default() }
}

impl Root {
    /// Usage reporting, with this VM's tally and the sink of its events, if it is configured.
    fn usage(&mut self, run: impl FnOnce(&mut Worker, &mut Tally, &mut UsageLog<'_>)) {
        let Some(shared) = self.shared.clone() else { return };
        let (Some(worker), Some(tally), Some(m)) = (self.usage.as_mut(), &shared.tally, &shared.metrics.usage) else {
            return;
        };
        // Never borrowed elsewhere at a tick: requests record between host calls, one at a time.
        let Ok(mut tally) = tally.try_borrow_mut() else { return };
        run(worker, &mut tally, &mut UsageLog(m));
        if let Some(stats) = worker.stats() {
            Metrics::record(m.keys_pending, stats.keys_pending);
        }
    }
}

impl Context for Root {
    fn on_http_call_response(&mut self, token: u32, _headers: usize, body_size: usize, _trailers: usize) {
        // The answer is read lazily: the reporter reads only the status, the sync checks the token
        // and the size before any body is copied into the VM.
        let answer = CallAnswer::new(body_size);
        let mut reporters = false;
        self.usage(|worker, _, log| reporters = worker.on_answer(token, &answer, now(), log));
        if reporters {
            // The reporter's POST: not the sync's.
            return;
        }
        let Some(shared) = self.shared.clone() else { return };
        let (Some(live), Some(sync)) = (&shared.live, self.sync.as_mut()) else { return };
        sync.on_answer(&HOST, live, &shared.policy.keys, token, body_size, &answer, &mut shared.report());
    }

    /// The configuration goes away (replaced, or Envoy stopping): the counts this VM holds go to
    /// shared data for the next reporter.
    fn on_done(&mut self) -> bool {
        self.usage(|worker, tally, log| worker.on_done(tally, &Envoy, log));
        self.usage = None;
        true
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
        let Plugin { policy, key_set, usage } = match Plugin::from_json(&text) {
            Ok(plugin) => plugin,
            Err(e) => {
                error!("keygate: invalid configuration: {e}");
                return false;
            }
        };
        let metrics = Metrics::define(key_set.is_some(), usage.is_some());
        Metrics::record(metrics.keys, policy.keys.len() as u64);
        info!("keygate: configured with {} inline keys, {} routes", policy.keys.len(), policy.routes.len());
        // A root context is configured once; should the host configure it again, what it counted
        // is handed over first.
        self.on_done();
        self.sync = None;
        let tick_ms = key_set.iter().map(|k| k.tick_ms()).chain(usage.iter().map(UsageConfig::tick_ms)).min();
        match tick_ms {
            None => {
                if let Err(status) = hostcalls::set_tick_period(IDLE_TICK) {
                    warn!("keygate: cannot set the tick period: {status:?}");
                }
            }
            Some(ms) => {
                if let Err(status) = hostcalls::set_tick_period(Duration::from_millis(ms)) {
                    error!("keygate: cannot set the tick period: {status:?}");
                    return false;
                }
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
            self.sync = Some(Syncer::new(me, monotonic_ms().unwrap_or_default()));
        }
        let mut tally = None;
        if let Some(config) = usage {
            // A number of its own for each configuration, not the VM's: the old and the new
            // configuration of one VM (an ECDS update) never both hold the reporting lease, and
            // their reports' batch ids differ.
            let numbered = number_vm_in(&Envoy, &config.vmseq_entry());
            let me = match numbered.and_then(|me| shared::prepare(&Envoy, &config.tally_entry()).map(|()| me)) {
                Ok(me) => me,
                Err(reason) => {
                    error!("keygate: cannot set up usage reporting in shared data: {reason}");
                    return false;
                }
            };
            // Envoy names its node `xds.node` (1.40); older hosts, `node`.
            let node = [vec!["xds", "node", "id"], vec!["node", "id"]]
                .into_iter()
                .find_map(|path| hostcalls::get_property(path).ok().flatten())
                .map(|id| String::from_utf8_lossy(&id).into_owned())
                .unwrap_or_default();
            tally = Some(RefCell::new(config.tally(now().wall_ms / 1_000)));
            self.usage = Some(Worker::new(config, me, &node));
        }
        self.shared = Some(Rc::new(Shared { policy, live: key_set.map(LiveSet::new), metrics, tally }));
        true
    }

    fn on_tick(&mut self) {
        follow_envoy_log_level();
        self.usage(|worker, tally, log| worker.on_tick(tally, &Envoy, &Envoy, now(), log));
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
        let decision = shared.policy.decide(&Keys(&shared), &request, &now_ms);
        if let Some(Ok(mut tally)) = shared.tally.as_ref().map(RefCell::try_borrow_mut) {
            tally.record(Outcome::of(&decision));
        }
        match decision {
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
                // Nothing goes upstream, but Envoy's access log reads these headers: none may keep
                // an identity the client sent. A failed removal is logged; the refusal stands.
                for name in &denial.remove {
                    if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name.as_ref()) {
                        error!("keygate: cannot remove header {name}: {status:?}");
                    }
                }
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
