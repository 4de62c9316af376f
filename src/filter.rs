//! The proxy-wasm glue: the only module that talks to the host. It reads the configuration, gathers
//! each request's headers in one host call, asks [`Policy::decide`], and carries the decision out.
//!
//! Host calls are made through `proxy_wasm::hostcalls`, whose results are handled here, rather than
//! through the SDK's trait defaults, which unwrap them.

use crate::keys::KeySource;
use crate::policy::{Decision, Policy, RequestView};
use crate::reply::DenyKind;
use log::{debug, error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType};
use std::rc::Rc;
use std::time::UNIX_EPOCH;

/// Counters and gauges, defined once per VM. Envoy shows them as `wasmcustom.keygate.*`.
#[derive(Debug, Default)]
struct Metrics {
    allowed: Option<u32>,
    denied: Vec<Option<u32>>,
    keys: Option<u32>,
}

impl Metrics {
    fn define() -> Self {
        let define = |kind, name: &str| match hostcalls::define_metric(kind, name) {
            Ok(id) => Some(id),
            Err(status) => {
                warn!("keygate: cannot define metric {name}: {status:?}");
                None
            }
        };
        Metrics {
            allowed: define(MetricType::Counter, "keygate.allowed"),
            denied: DenyKind::ALL
                .iter()
                .map(|k| define(MetricType::Counter, &format!("keygate.denied.{}", k.name())))
                .collect(),
            keys: define(MetricType::Gauge, "keygate.keys"),
        }
    }

    fn bump(id: Option<u32>) {
        if let Some(id) = id {
            // A failed stat update must not change the answer to the request.
            let _ = hostcalls::increment_metric(id, 1);
        }
    }
}

/// What every request context shares: the compiled policy and the metric ids.
struct Shared {
    policy: Policy,
    metrics: Metrics,
}

/// The plugin's root context: compiles the configuration, hands it to each request.
#[derive(Default)]
pub struct Root {
    shared: Option<Rc<Shared>>,
    metrics: Option<Rc<Metrics>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("keygate: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        match Policy::from_json(&text) {
            Ok(policy) => {
                let metrics = Metrics::define();
                if let Some(gauge) = metrics.keys {
                    let _ = hostcalls::record_metric(gauge, policy.keys.len() as u64);
                }
                info!("keygate: configured with {} keys, {} routes", policy.keys.len(), policy.routes.len());
                self.metrics = None;
                self.shared = Some(Rc::new(Shared { policy, metrics }));
                true
            }
            Err(e) => {
                error!("keygate: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request { shared: self.shared.clone() }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

/// One request.
struct Request {
    shared: Option<Rc<Shared>>,
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
        let request = RequestView::from_headers(&headers);
        let keys: &dyn KeySource = &shared.policy.keys;
        match shared.policy.decide(keys, &request, &now_ms) {
            Decision::Allow { edits, key_id } => {
                for name in &edits.remove {
                    if let Err(status) = hostcalls::remove_map_value(MapType::HttpRequestHeaders, name) {
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
                Action::Continue
            }
            Decision::Deny(denial) => {
                let request_id = headers
                    .iter()
                    .find(|(n, _)| n == "x-request-id")
                    .map(|(_, v)| String::from_utf8_lossy(v))
                    .unwrap_or_default();
                let reply = shared.policy.replies.render(denial.kind, &denial.missing_scopes, &request_id);
                match &denial.key_id {
                    Some(id) => debug!("keygate: denied {} for key {id}", denial.kind.name()),
                    None => debug!("keygate: denied {}", denial.kind.name()),
                }
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
}

fn now_ms() -> Option<i64> {
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}

/// Refuses the request with a 500 when keygate cannot do its job: failing closed.
fn send_internal_error(reason: &str) -> Action {
    let body = format!("{{\"error\":\"internal_error\",\"message\":\"{reason}\"}}");
    let headers = vec![("content-type", "application/json")];
    if let Err(status) = hostcalls::send_http_response(500, headers, Some(body.as_bytes())) {
        error!("keygate: cannot send the 500 reply: {status:?}");
    }
    Action::Pause
}
