//! keygate's stats, defined once per VM (Envoy shows them as `wasmcustom.keygate.*`), and the sink
//! that turns the key-set sync's events into log lines and stats.

use keygate_core::live::{Event, Sink};
use keygate_core::reply::DenyKind;
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
    pub fn define(live: bool) -> Self {
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
        }
    }

    pub fn bump(id: Option<u32>) {
        if let Some(id) = id {
            // A failed stat update must not change the answer to the request.
            let _ = hostcalls::increment_metric(id, 1);
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
