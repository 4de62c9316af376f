//! The host calls keygate-core's key-set sync and usage reporting need, through
//! `proxy_wasm::hostcalls`: shared data ([`Store`]), HTTP calls ([`Fetch`], [`Post`]), Envoy's
//! steady clock ([`Clock`]) and wall clock, and the answer of a call, read lazily ([`Answer`]).
//! Every error is returned, never unwrapped. The only `unsafe` of the filter is here (the WASI
//! clocks).

use keygate_core::live::{Answer, Clock, Fetch, Store, StoreError, StoreOp, VmNumber};
use keygate_core::usage::Post;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{BufferType, MapType, Status};
use std::cell::OnceCell;
use std::time::{Duration, UNIX_EPOCH};

/// The proxy-wasm host: shared data, HTTP calls and the monotonic clock.
pub struct Envoy;

impl Store for Envoy {
    fn get(&self, entry: &str) -> Result<Option<(Vec<u8>, u32)>, StoreError> {
        match hostcalls::get_shared_data(entry) {
            Ok((value, Some(cas))) => Ok(Some((value.unwrap_or_default(), cas))),
            Ok((_, None)) => Ok(None),
            Err(status) => Err(StoreError::new(StoreOp::Read, entry, format!("{status:?}"))),
        }
    }

    fn set(&self, entry: &str, value: &[u8], cas: Option<u32>) -> Result<bool, StoreError> {
        match hostcalls::set_shared_data(entry, Some(value), cas) {
            Ok(()) => Ok(true),
            Err(Status::CasMismatch) => Ok(false),
            Err(status) => Err(StoreError::new(StoreOp::Write, entry, format!("{status:?}"))),
        }
    }
}

impl Fetch for Envoy {
    fn get(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String> {
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), None, vec![], Duration::from_millis(timeout_ms))
            .map_err(|status| format!("cannot call cluster {cluster:?}: {status:?}"))
    }
}

impl Post for Envoy {
    fn post(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        let timeout = Duration::from_millis(timeout_ms);
        hostcalls::dispatch_http_call(cluster, headers.to_vec(), Some(body), vec![], timeout)
            .map_err(|status| format!("cannot call cluster {cluster:?}: {status:?}"))
    }
}

impl Clock for Envoy {
    fn monotonic_ms(&self) -> Option<i64> {
        monotonic_ms()
    }
}

/// The answer of the HTTP call being handled: headers read on first use, the body only when asked.
pub struct CallAnswer {
    body_size: usize,
    headers: OnceCell<Vec<(String, Vec<u8>)>>,
}

impl CallAnswer {
    pub fn new(body_size: usize) -> Self {
        CallAnswer { body_size, headers: OnceCell::new() }
    }

    fn header(&self, name: &str) -> Option<String> {
        let headers =
            self.headers.get_or_init(|| hostcalls::get_map_bytes(MapType::HttpCallResponseHeaders).unwrap_or_default());
        headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

impl Answer for CallAnswer {
    fn status(&self) -> u16 {
        self.header(":status").and_then(|s| s.parse().ok()).unwrap_or(0)
    }

    fn etag(&self) -> Option<String> {
        self.header("etag")
    }

    fn body(&self) -> Vec<u8> {
        match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, self.body_size) {
            Ok(b) => b.unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }
}

thread_local! {
    /// This VM's number: kept across reconfigurations (ECDS, a new `WasmPlugin`), so the new root
    /// context of a VM that held the polling lease goes on holding it.
    pub static VM_NUMBER: VmNumber = const { VmNumber::new() };
}

/// Envoy's steady clock in milliseconds, through WASI's `clock_time_get` (proxy-wasm 0.2 has no
/// monotonic clock of its own; Envoy answers it with its dispatcher's monotonic time). One clock for
/// every VM of the process that no wall-clock step moves: the polling schedule, the leases, the sync
/// age and the usage reports' schedule use it. Falls back to the wall clock should the host refuse.
pub fn monotonic_ms() -> Option<i64> {
    wasi_clock_ms(WasiClock::Monotonic).or_else(now_ms)
}

/// The wall clock in Unix milliseconds through WASI's `clock_time_get`: when a usage reporter
/// starts (its batch ids' epoch) and the coarse time its counts are stamped with. Falls back to
/// proxy-wasm's clock should the host refuse.
pub fn wall_ms() -> Option<i64> {
    wasi_clock_ms(WasiClock::Realtime).or_else(now_ms)
}

/// WASI's clock ids.
#[derive(Clone, Copy)]
enum WasiClock {
    Realtime = 0,
    Monotonic = 1,
}

/// A WASI clock in milliseconds; `None` when the host refuses.
fn wasi_clock_ms(clock: WasiClock) -> Option<i64> {
    #[cfg(target_arch = "wasm32")]
    {
        #[link(wasm_import_module = "wasi_snapshot_preview1")]
        extern "C" {
            fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
        }
        let mut nanos: u64 = 0;
        // SAFETY: WASI's clock_time_get takes a clock id, a precision and a pointer to 8 writable
        // bytes of this module's memory, and writes only there; `nanos` is a live, aligned u64.
        let errno = unsafe { clock_time_get(clock as u32, 1_000_000, &mut nanos) };
        (errno == 0).then(|| i64::try_from(nanos / 1_000_000).ok()).flatten()
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        // Off wasm (the host build of this module, which never runs a sync): the process's clocks.
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        match clock {
            WasiClock::Monotonic => {
                i64::try_from(START.get_or_init(std::time::Instant::now).elapsed().as_millis()).ok()
            }
            WasiClock::Realtime => {
                i64::try_from(std::time::SystemTime::now().duration_since(UNIX_EPOCH).ok()?.as_millis()).ok()
            }
        }
    }
}

/// The wall clock in Unix milliseconds: key expiry (`expires_at`) only.
pub fn now_ms() -> Option<i64> {
    let now = hostcalls::get_current_time().ok()?;
    let since = now.duration_since(UNIX_EPOCH).ok()?;
    i64::try_from(since.as_millis()).ok()
}
