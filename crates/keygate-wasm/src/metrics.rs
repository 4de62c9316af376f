//! keygate's stats, defined once per VM (Envoy shows them as `wasmcustom.keygate.*`), and the sinks
//! that turn the key-set sync's and usage reporting's events into log lines and stats.

use keygate_core::live::{Event, Sink};
use keygate_core::reply::DenyKind;
use keygate_core::usage;
use log::{debug, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

/// Counters and gauges.
#[derive(Debug, Default)]
pub struct Metrics {
    pub allowed: Option<u32>,
    pub denied: Vec<Option<u32>>,
    pub keys: Option<u32>,
    pub live: Option<LiveMetrics>,
    pub usage: Option<UsageMetrics>,
}

/// Usage reporting's stats, defined only when it is configured. Every VM defines them; only the
/// one reporting for the process moves them (Envoy keeps one stat per name for all VMs).
#[derive(Debug, Default)]
pub struct UsageMetrics {
    reports_sent: Option<u32>,
    failures: Option<u32>,
    dropped: Option<u32>,
    pub keys_pending: Option<u32>,
}

/// The live key set's stats, defined only when one is configured.
#[derive(Debug, Default)]
pub struct LiveMetrics {
    version: Option<u32>,
    keys: Option<u32>,
    seconds_since_sync: Option<u32>,
    syncs: Option<u32>,
    sync_failures: Option<u32>,
}

fn define_metric(kind: MetricType, name: &str) -> Option<u32> {
    match hostcalls::define_metric(kind, name) {
        Ok(id) => Some(id),
        Err(status) => {
            warn!("keygate: cannot define metric {name}: {status:?}");
            None
        }
    }
}

impl Metrics {
    pub fn define(live: bool, usage: bool) -> Self {
        Metrics {
            allowed: define_metric(MetricType::Counter, "keygate.allowed"),
            denied: DenyKind::ALL
                .iter()
                .map(|k| define_metric(MetricType::Counter, &format!("keygate.denied.{}", k.name())))
                .collect(),
            keys: define_metric(MetricType::Gauge, "keygate.keys"),
            live: live.then(|| LiveMetrics {
                version: define_metric(MetricType::Gauge, "keygate.key_set.version"),
                keys: define_metric(MetricType::Gauge, "keygate.key_set.keys"),
                seconds_since_sync: define_metric(MetricType::Gauge, "keygate.key_set.seconds_since_sync"),
                syncs: define_metric(MetricType::Counter, "keygate.key_set.syncs"),
                sync_failures: define_metric(MetricType::Counter, "keygate.key_set.sync_failures"),
            }),
            usage: usage.then(|| UsageMetrics {
                reports_sent: define_metric(MetricType::Counter, "keygate.usage.reports_sent"),
                failures: define_metric(MetricType::Counter, "keygate.usage.failures"),
                dropped: define_metric(MetricType::Counter, "keygate.usage.dropped"),
                keys_pending: define_metric(MetricType::Gauge, "keygate.usage.keys_pending"),
            }),
        }
    }

    pub fn bump(id: Option<u32>) {
        Metrics::add(id, 1);
    }

    pub fn add(id: Option<u32>, n: u64) {
        if let Some(id) = id {
            // A failed stat update must not change the answer to the request.
            let _ = hostcalls::increment_metric(id, i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn record(id: Option<u32>, value: u64) {
        if let Some(id) = id {
            let _ = hostcalls::record_metric(id, value);
        }
    }
}

/// Logs and counts what the key-set sync reports. `inline_keys` counts into `keygate.keys`.
pub struct Report<'a> {
    pub metrics: &'a Metrics,
    pub inline_keys: u64,
}

impl Sink for Report<'_> {
    fn report(&mut self, event: Event) {
        let Some(m) = &self.metrics.live else { return };
        match &event {
            Event::Gauges(g) => {
                Metrics::record(m.seconds_since_sync, g.seconds_since_sync);
                if let Some(set) = &g.loaded {
                    Metrics::record(m.version, set.version);
                    Metrics::record(m.keys, set.keys);
                    Metrics::record(self.metrics.keys, set.keys + self.inline_keys);
                }
            }
            Event::Synced { changed, .. } => {
                Metrics::bump(m.syncs);
                if *changed {
                    info!("keygate: {event}");
                } else {
                    debug!("keygate: {event}");
                }
            }
            Event::Failed { .. } => {
                Metrics::bump(m.sync_failures);
                warn!("keygate: {event}");
            }
            Event::Abandoned { .. } => info!("keygate: {event}"),
            Event::LeaseTrouble(_) | Event::ScheduleTrouble(_) => warn!("keygate: {event}"),
        }
    }
}

/// Logs and counts what usage reporting reports, at the levels of the key-set sync's lines: a
/// report taken as a sync that changed nothing (debug), a failure as a failed sync (warn).
pub struct UsageLog<'a>(pub &'a UsageMetrics);

impl Sink<usage::Event> for UsageLog<'_> {
    fn report(&mut self, event: usage::Event) {
        let m = self.0;
        match &event {
            usage::Event::Sent { .. } => {
                Metrics::bump(m.reports_sent);
                debug!("keygate: {event}");
                return;
            }
            usage::Event::Failed { .. } => Metrics::bump(m.failures),
            usage::Event::Dropped { requests }
            | usage::Event::Refused { requests, .. }
            | usage::Event::Abandoned { requests, .. } => Metrics::add(m.dropped, *requests),
            usage::Event::Trouble(_) => {}
        }
        warn!("keygate: {event}");
    }
}
