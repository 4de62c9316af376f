//! Envoy's dynamic-module ABI, as far as keygate uses it, and every `unsafe` of this crate.
//!
//! Written against Envoy 1.40.0 (commit 9e5580933739775e8bce696a57a2e1bc99368f23): the types and
//! functions below follow `source/extensions/dynamic_modules/abi/abi.h` (C names in the doc
//! comments), and each callback declared here is one that the 1.40.0 binary exports
//! (`nm -D --defined-only envoy | grep envoy_dynamic_module_callback_`). The hooks' signatures match
//! the function-pointer types Envoy 1.40.0 resolves them as (its `getFunctionPointer<T>`
//! instantiations, visible in the binary's strings). Only what keygate calls is declared: no
//! bindgen, no SDK.
//!
//! Rules of the ABI this module relies on, from `abi.h`'s OWNERSHIP and PRECONDITION notes (the
//! `// SAFETY:` comments name them):
//!
//! - **R1 buffers in**: a buffer Envoy passes to a hook (`envoy_dynamic_module_type_envoy_buffer`)
//!   is owned by Envoy and valid, for `length` bytes, until the hook returns; it may be null when
//!   empty.
//! - **R2 buffers out**: a buffer the module passes to a callback
//!   (`envoy_dynamic_module_type_module_buffer`, `..._module_http_header`) is only read during
//!   the call; Envoy copies what it keeps.
//! - **R3 header array**: `http_get_headers` writes exactly `http_get_headers_size` entries into
//!   the array it is given (the caller sizes it), each pointing into Envoy's header map; they stay
//!   valid until the hook returns or a header is changed.
//! - **R4 config pointer**: the pointer `on_http_filter_config_new` returns is owned by the
//!   module and handed back to every later hook of that configuration until
//!   `on_http_filter_config_destroy`, after which the module may free it. Envoy calls that once,
//!   after the last stream made from the configuration is gone: each of its stream filters holds
//!   a shared reference to its configuration (Envoy's `DynamicModuleHttpFilter`).
//! - **R5 Envoy pointers**: `filter_config_envoy_ptr` is valid during every configuration hook
//!   that is given it (`on_http_filter_config_new`, `..._config_scheduled`,
//!   `..._config_http_callout_done`), `filter_envoy_ptr` during every hook of its stream; callbacks
//!   take them back unchanged, on the thread of the hook.
//! - **R7 configuration events**: a configuration's scheduler holds a weak reference to it; the
//!   scheduled hook runs on the main thread only while the configuration lives (an event committed
//!   after it is gone is dropped), and so does the callout hook. Neither can overlap
//!   `on_http_filter_config_destroy`, which runs when the last reference goes.
//! - **R6 threads**: the configuration hooks run on the main thread, a stream's hooks on its
//!   worker thread; several workers run hooks of one configuration at once.
//! - **R8 stream pointer**: the pointer `on_http_filter_new` returns is handed back unchanged to
//!   every later hook of that stream, one at a time on its worker thread (R6), and to
//!   `on_http_filter_destroy` once, after which Envoy no longer uses it (its
//!   `DynamicModuleHttpFilter` forgets it then; a null one is never destroyed). The stream holds
//!   a reference to its configuration meanwhile (R4).
//! - **R9 trailers**: during `on_http_filter_request_trailers`, `http_get_headers_size`,
//!   `http_get_headers` and `http_set_header` with the `RequestTrailer` type act on that
//!   stream's request trailers as R3 and R2 say for headers.
//!
//! No panic crosses the boundary. Every hook that does more than return a constant runs its body
//! in [`guarded`] (`catch_unwind`), or for a stream hook through [`Request`], whose fallback fails
//! closed: a refused request (500) or a refused configuration. The workspace's release profile unwinds (the wasm filter has a profile of
//! its own that aborts, as wasm32-wasip1 must), so in the `libkeygate.so` Envoy loads a defect that
//! panics costs one refused request, not the Envoy process. The code is still written never to
//! panic: the workspace's clippy lints deny `unwrap`, `expect`, `panic!` and indexing outside
//! tests, and every hook's safe half is tested on the host (filter_tests.rs, which also proves the
//! panic fallbacks; filter_props.rs and fuzz/'s `native` target, with arbitrary input). No
//! unwinding can leave an `extern "C"` function either way: Rust aborts there.

// Every unsafe operation sits in its own block with its reason, unsafe functions included.
#![deny(unsafe_op_in_unsafe_fn)]

use crate::filter::{self, guarded, ConfigHost, Filter, Level, Log, Request, Stream, Unreadable, Verdict};
use crate::live::{self, CalloutAnswer, Ticker};
use keygate_core::live::Fetch;
use keygate_core::usage::Post;
use std::ffi::{c_char, c_void};
use std::ptr;
use std::sync::Arc;

/// The one spelling of the ABI version, for [`ABI_VERSION`] and its C string.
macro_rules! abi_version {
    () => {
        "v0.2.0"
    };
}

/// The ABI version keygate is written against, returned from `envoy_dynamic_module_on_program_init`.
/// It is Envoy 1.40.0's `ENVOY_DYNAMIC_MODULES_ABI_VERSION`: the only `vX.Y.Z` string in the
/// 1.40.0 binary's read-only data, and the one its loader answers with "Dynamic module ABI version
/// v0.2.0 matched." (tests/native.rs asserts that line). On another version Envoy 1.40.0 logs a
/// warning ("... is deprecated. Please recompile ...") and loads the module all the same. The
/// `abi.h` these declarations follow is the newest stored one, which still says "v0.1.0" and lacks
/// callbacks 1.40.0 exports (such as `envoy_dynamic_module_callback_log_v2`); every declaration
/// below is in both, and behaves as declared in 1.40.0 (tests/native.rs: the headers read back, the
/// edits the upstream sees, the replies, the stats, the log lines).
pub const ABI_VERSION: &str = abi_version!();
/// [`ABI_VERSION`] as the null-terminated string the ABI wants (it must outlive `on_program_init`).
static ABI_VERSION_C: &str = concat!(abi_version!(), "\0");

// ---- Types (abi.h "Common Types", "HTTP Filter Types") -------------------------------------------

/// `envoy_dynamic_module_type_envoy_buffer`: bytes owned by Envoy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    ptr: *const c_char,
    length: usize,
}

/// `envoy_dynamic_module_type_module_buffer`: bytes owned by the module.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    ptr: *const c_char,
    length: usize,
}

impl ModuleBuffer {
    fn of(bytes: &[u8]) -> ModuleBuffer {
        ModuleBuffer { ptr: bytes.as_ptr().cast(), length: bytes.len() }
    }

    /// The null buffer: as a header value, "remove the header".
    const NULL: ModuleBuffer = ModuleBuffer { ptr: ptr::null(), length: 0 };
}

/// `envoy_dynamic_module_type_envoy_http_header`: one header of Envoy's map.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_module_http_header`: one header of a reply keygate sends.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleHttpHeader {
    key_ptr: *const c_char,
    key_length: usize,
    value_ptr: *const c_char,
    value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type` (a C enum: an `int`-sized integer).
type HeaderType = u32;
/// `envoy_dynamic_module_type_http_header_type_RequestHeader`.
const REQUEST_HEADER: HeaderType = 0;
/// `envoy_dynamic_module_type_http_header_type_RequestTrailer`.
const REQUEST_TRAILER: HeaderType = 1;

/// `envoy_dynamic_module_type_log_level`: Trace 0, Debug 1, Info 2, Warn 3, Error 4, Critical 5, Off 6.
type LogLevel = u32;

fn log_level(level: Level) -> LogLevel {
    match level {
        Level::Debug => 1,
        Level::Info => 2,
        Level::Warn => 3,
        Level::Error => 4,
    }
}

/// `envoy_dynamic_module_type_metrics_result`; 0 is `Success`.
type MetricsResult = u32;
const METRICS_SUCCESS: MetricsResult = 0;

/// `envoy_dynamic_module_type_on_http_filter_request_headers_status` and the other status
/// enums of the stream hooks: 0 is `Continue` in each, 1 `StopIteration` in the headers and
/// trailers ones.
type Status = u32;
const CONTINUE: Status = 0;
const STOP_ITERATION: Status = 1;

/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`.
type ConfigEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_config_module_ptr`.
type ConfigModulePtr = *const c_void;
/// `envoy_dynamic_module_type_http_filter_config_scheduler_module_ptr`.
type SchedulerPtr = *mut c_void;

/// `envoy_dynamic_module_type_http_callout_init_result`; 0 is `Success` (then MissingRequiredHeaders,
/// ClusterNotFound, DuplicateCalloutId, CannotCreateRequest).
type CalloutInitResult = u32;
const CALLOUT_INIT_SUCCESS: CalloutInitResult = 0;
/// `envoy_dynamic_module_type_http_callout_result`; 0 is `Success` (then Reset,
/// ExceedResponseBufferLimit).
type CalloutResult = u32;
const CALLOUT_SUCCESS: CalloutResult = 0;

/// `envoy_dynamic_module_type_http_filter_envoy_ptr`.
type FilterEnvoyPtr = *mut c_void;
/// `envoy_dynamic_module_type_http_filter_module_ptr`.
type FilterModulePtr = *const c_void;

// ---- Callbacks (implemented by Envoy) -------------------------------------------------------------

extern "C" {
    /// Logs under Envoy's `dynamic_modules` component. (1.40 also has `log_v2`, with a source
    /// location; this one, in every release since the version string, is enough.)
    fn envoy_dynamic_module_callback_log(level: LogLevel, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_log_enabled(level: LogLevel) -> bool;

    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        counter_id_ptr: *mut usize,
    ) -> MetricsResult;
    fn envoy_dynamic_module_callback_http_filter_increment_counter(
        filter_envoy_ptr: FilterEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;
    fn envoy_dynamic_module_callback_http_filter_config_define_gauge(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        gauge_id_ptr: *mut usize,
    ) -> MetricsResult;
    fn envoy_dynamic_module_callback_http_filter_config_set_gauge(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Same shape as `..._config_set_gauge` (1.40.0's code for both takes the same arguments in
    /// the same registers); absent from the stored `abi.h`, exported by 1.40.0.
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> MetricsResult;

    /// Starts an HTTP request to `cluster_name` from the configuration (on the main thread); its
    /// answer comes to `envoy_dynamic_module_on_http_filter_config_http_callout_done` with the id
    /// Envoy writes to `callout_id_out`.
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHttpHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> CalloutInitResult;

    /// A scheduler that runs events of this configuration on the main thread
    /// (`envoy_dynamic_module_on_http_filter_config_scheduled`). It holds a weak reference to the
    /// configuration: an event committed once the configuration is gone is dropped.
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(
        filter_config_envoy_ptr: ConfigEnvoyPtr,
    ) -> SchedulerPtr;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(scheduler: SchedulerPtr, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: SchedulerPtr);

    fn envoy_dynamic_module_callback_http_get_headers_size(
        filter_envoy_ptr: FilterEnvoyPtr,
        header_type: HeaderType,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter_envoy_ptr: FilterEnvoyPtr,
        header_type: HeaderType,
        result_headers: *mut EnvoyHttpHeader,
    ) -> bool;
    /// Replaces every value of `key`; a null `value` removes the header. Keys are lower-cased by
    /// Envoy.
    fn envoy_dynamic_module_callback_http_set_header(
        filter_envoy_ptr: FilterEnvoyPtr,
        header_type: HeaderType,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter_envoy_ptr: FilterEnvoyPtr,
        status_code: u32,
        headers_vector: *mut ModuleHttpHeader,
        headers_vector_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
}

// ---- Safe handles --------------------------------------------------------------------------------

/// Envoy's log, shared by both handles.
struct EnvoyLog;

impl Log for EnvoyLog {
    fn enabled(&self, level: Level) -> bool {
        // SAFETY: a module-wide callback with a plain integer argument; callable from any hook.
        unsafe { envoy_dynamic_module_callback_log_enabled(log_level(level)) }
    }

    fn log(&self, level: Level, message: &str) {
        // SAFETY: R2, the message is only read during the call.
        unsafe { envoy_dynamic_module_callback_log(log_level(level), ModuleBuffer::of(message.as_bytes())) }
    }
}

/// The configuration being created, during `on_http_filter_config_new`.
struct ConfigHandle(ConfigEnvoyPtr);

impl Log for ConfigHandle {
    fn enabled(&self, level: Level) -> bool {
        EnvoyLog.enabled(level)
    }
    fn log(&self, level: Level, message: &str) {
        EnvoyLog.log(level, message);
    }
}

impl ConfigHost for ConfigHandle {
    fn define_counter(&mut self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: R5, the config pointer is the one this hook was given; R2, the name is only read
        // during the call; no labels (null, 0); `id` is a valid place for Envoy to write.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_counter(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    fn define_gauge(&mut self, name: &str) -> Option<usize> {
        let mut id = 0usize;
        // SAFETY: as for define_counter.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_define_gauge(
                self.0,
                ModuleBuffer::of(name.as_bytes()),
                ptr::null_mut(),
                0,
                &mut id,
            )
        };
        (result == METRICS_SUCCESS).then_some(id)
    }

    fn set_gauge(&mut self, id: usize, value: u64) {
        // SAFETY: R5; `id` came from define_gauge on this configuration; no labels.
        // A failed stat update must not change the outcome: the result is ignored.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_filter_config_set_gauge(self.0, id, ptr::null_mut(), 0, value)
        };
    }

    fn increment_counter(&mut self, id: usize) {
        // SAFETY: R5 (the config pointer of the running configuration hook); `id` came from
        // define_counter on this configuration; no labels. The result is ignored, as above.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(self.0, id, ptr::null_mut(), 0, 1)
        };
    }

    fn add_counter(&mut self, id: usize, n: u64) {
        // SAFETY: as for increment_counter.
        let _ = unsafe {
            envoy_dynamic_module_callback_http_filter_config_increment_counter(self.0, id, ptr::null_mut(), 0, n)
        };
    }
}

impl Fetch for ConfigHandle {
    fn get(&self, cluster: &str, headers: &[(&str, &str)], timeout_ms: u64) -> Result<u32, String> {
        self.callout(cluster, headers, &[], timeout_ms)
    }
}

impl Post for ConfigHandle {
    fn post(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        self.callout(cluster, headers, body, timeout_ms)
    }
}

impl ConfigHandle {
    /// An HTTP request from the configuration (a key-set GET, a usage POST); the token of its
    /// answer.
    fn callout(&self, cluster: &str, headers: &[(&str, &str)], body: &[u8], timeout_ms: u64) -> Result<u32, String> {
        let mut array: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHttpHeader {
                key_ptr: n.as_ptr().cast(),
                key_length: n.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        let mut id = 0u64;
        // SAFETY: R5, the config pointer of the running configuration hook (main thread, R6); R2,
        // the cluster name, the header array, the strings it points at and the body are only read
        // during the call; `id` is a valid place for Envoy to write.
        let result = unsafe {
            envoy_dynamic_module_callback_http_filter_config_http_callout(
                self.0,
                &mut id,
                ModuleBuffer::of(cluster.as_bytes()),
                array.as_mut_ptr(),
                array.len(),
                if body.is_empty() { ModuleBuffer::NULL } else { ModuleBuffer::of(body) },
                timeout_ms,
            )
        };
        if result != CALLOUT_INIT_SUCCESS {
            return Err(format!("cannot call cluster {cluster:?}: callout refused ({result})"));
        }
        live::callout_token(id)
    }
}

/// One stream, during one of its hooks.
struct StreamHandle(FilterEnvoyPtr);

impl Log for StreamHandle {
    fn enabled(&self, level: Level) -> bool {
        EnvoyLog.enabled(level)
    }
    fn log(&self, level: Level, message: &str) {
        EnvoyLog.log(level, message);
    }
}

/// The bytes of a buffer Envoy owns.
///
/// # Safety
/// `ptr` is null or points at `length` readable bytes that outlive `'a` (R1, R3).
unsafe fn envoy_bytes<'a>(ptr: *const c_char, length: usize) -> &'a [u8] {
    if ptr.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: the caller's contract; a non-null pointer with a length is a readable slice.
    unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), length) }
}

impl StreamHandle {
    /// Every entry of one of the stream's maps (request headers or, R9, trailers), copied.
    fn map(&mut self, kind: HeaderType) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        // SAFETY: R5, the stream pointer of the running hook.
        let size = unsafe { envoy_dynamic_module_callback_http_get_headers_size(self.0, kind) };
        let empty = EnvoyHttpHeader { key_ptr: ptr::null(), key_length: 0, value_ptr: ptr::null(), value_length: 0 };
        let mut array = vec![empty; size];
        // SAFETY: R3 (R9), the array has exactly the `size` entries Envoy reported, and nothing
        // changed the map in between (same hook, same thread).
        if !unsafe { envoy_dynamic_module_callback_http_get_headers(self.0, kind, array.as_mut_ptr()) } {
            return Err(Unreadable::Host);
        }
        filter::owned_headers(array.iter().map(|h| {
            // SAFETY: R3, each entry points into Envoy's map, unchanged until the copies below are
            // made (owned_headers copies before any entry is set).
            unsafe { (envoy_bytes(h.key_ptr, h.key_length), envoy_bytes(h.value_ptr, h.value_length)) }
        }))
    }

    /// Removes every value of `name` from one of the stream's maps.
    fn remove(&mut self, kind: HeaderType, name: &str) -> bool {
        // SAFETY: R5; R2, the key is only read during the call; a null value removes the entry
        // (R9 for trailers).
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                kind,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::NULL,
            )
        }
    }
}

impl Stream for StreamHandle {
    fn request_headers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        self.map(REQUEST_HEADER)
    }

    fn remove_request_header(&mut self, name: &str) -> bool {
        self.remove(REQUEST_HEADER, name)
    }

    fn request_trailers(&mut self) -> Result<Vec<(String, Vec<u8>)>, Unreadable> {
        self.map(REQUEST_TRAILER)
    }

    fn remove_request_trailer(&mut self, name: &str) -> bool {
        self.remove(REQUEST_TRAILER, name)
    }

    fn set_request_header(&mut self, name: &str, value: &str) -> bool {
        // SAFETY: R5; R2, key and value are only read during the call.
        unsafe {
            envoy_dynamic_module_callback_http_set_header(
                self.0,
                REQUEST_HEADER,
                ModuleBuffer::of(name.as_bytes()),
                ModuleBuffer::of(value.as_bytes()),
            )
        }
    }

    fn send_response(&mut self, status: u16, headers: &[(&str, &str)], body: &str) {
        let mut array: Vec<ModuleHttpHeader> = headers
            .iter()
            .map(|(n, v)| ModuleHttpHeader {
                key_ptr: n.as_ptr().cast(),
                key_length: n.len(),
                value_ptr: v.as_ptr().cast(),
                value_length: v.len(),
            })
            .collect();
        // SAFETY: R5; R2, the header array, the strings it points at and the body are only read
        // during the call and outlive it; a null `details` lets Envoy use its default.
        unsafe {
            envoy_dynamic_module_callback_http_send_response(
                self.0,
                u32::from(status),
                array.as_mut_ptr(),
                array.len(),
                ModuleBuffer::of(body.as_bytes()),
                ModuleBuffer::NULL,
            )
        }
    }

    fn increment_counter(&mut self, id: usize) {
        // SAFETY: R5; `id` was defined on the configuration this stream was made from; no labels.
        // A failed stat update must not change the answer to the request: the result is ignored.
        let _ =
            unsafe { envoy_dynamic_module_callback_http_filter_increment_counter(self.0, id, ptr::null_mut(), 0, 1) };
    }
}

/// A configuration as the module keeps it: the filter, and for a live key set the thread that
/// ticks its sync and the scheduler it commits to. Fields drop in order: the ticker is stopped and
/// joined before the configuration's reference to the scheduler goes.
#[allow(dead_code)] // `ticker` and `scheduler` are held for their `Drop`
struct Configured {
    filter: Filter,
    ticker: Option<Ticker>,
    scheduler: Option<Arc<Scheduler>>,
}

/// A configuration's scheduler, shared by the configuration and its ticker thread, deleted when
/// the last of them lets go.
struct Scheduler(SchedulerPtr);

// SAFETY: Envoy's configuration scheduler is made to be committed to from any thread (commit posts
// the event to the main thread's dispatcher, holding only a weak reference to the configuration);
// it is deleted once, by the last owner (`Drop`), when no thread can commit to it any more.
unsafe impl Send for Scheduler {}
// SAFETY: as for Send: commit is the only shared use, and it is thread-safe.
unsafe impl Sync for Scheduler {}

/// The only event keygate schedules: a tick of the key-set sync.
const TICK_EVENT: u64 = 1;

impl Scheduler {
    fn commit(&self) {
        // SAFETY: the pointer came from scheduler_new and is deleted only when this is dropped;
        // commit may be called from any thread (see the Send impl).
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.0, TICK_EVENT) }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // SAFETY: a pointer from scheduler_new, deleted once, by its last owner.
        unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.0) }
    }
}

/// The configuration behind a module pointer.
///
/// # Safety
/// `ptr` is null or a pointer [`envoy_dynamic_module_on_http_filter_config_new`] returned whose
/// configuration is not destroyed yet (R4).
unsafe fn configured<'a>(ptr: *const c_void) -> Option<&'a Configured> {
    // SAFETY: the caller's contract: such a pointer is a live `Box<Configured>`, only ever read
    // (its interior locks are its own).
    unsafe { ptr.cast::<Configured>().as_ref() }
}

/// What a stream's module pointer points at: its configuration, and what the stream keeps between
/// its hooks (the verdict on its headers, for its trailers). Made by `on_http_filter_new`, freed
/// by `on_http_filter_destroy`; used by the stream's hooks, one at a time on its worker thread (R8).
struct StreamState {
    config: ConfigModulePtr,
    request: Request,
}

/// Runs a stream hook: `hook` gets the stream's [`Request`] (a fresh one for a null module
/// pointer, which refuses the request as not configured) and its filter.
///
/// # Safety
/// `ptr` is null or a pointer [`envoy_dynamic_module_on_http_filter_new`] returned for a stream
/// that is not destroyed yet (R8), and `filter_envoy_ptr` is that stream's (R5).
unsafe fn on_stream(
    filter_envoy_ptr: FilterEnvoyPtr,
    ptr: FilterModulePtr,
    hook: impl FnOnce(&Request, Option<&Filter>, &mut dyn Stream) -> Verdict,
) -> Status {
    // SAFETY: the caller's contract: such a pointer is a live `Box<StreamState>`, only read here
    // (its `Request` keeps its own `Cell`).
    let state = unsafe { ptr.cast::<StreamState>().as_ref() };
    // SAFETY: R4, the configuration of a live stream is alive; `config` is the pointer config_new
    // returned for it.
    let filter = state.and_then(|s| unsafe { configured(s.config) }).map(|c| &c.filter);
    let fresh = Request::default();
    let request = state.map_or(&fresh, |s| &s.request);
    match hook(request, filter, &mut StreamHandle(filter_envoy_ptr)) {
        Verdict::Continue => CONTINUE,
        Verdict::Stop => STOP_ITERATION,
    }
}

/// Starts the ticks of a configuration with a live key set: a scheduler, and a thread that commits
/// a tick event to it every tick. `None` (logged) refuses the configuration.
fn start_ticks(filter_config_envoy_ptr: ConfigEnvoyPtr, filter: Filter) -> Option<Configured> {
    let Some(period) = filter.tick() else { return Some(Configured { filter, ticker: None, scheduler: None }) };
    // SAFETY: R5, the config pointer of the running config_new hook.
    let raw = unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(filter_config_envoy_ptr) };
    if raw.is_null() {
        EnvoyLog.log(Level::Error, "keygate: Envoy gave no scheduler for the key-set sync");
        return None;
    }
    let scheduler = Arc::new(Scheduler(raw));
    let ticks = Arc::clone(&scheduler);
    let Some(ticker) = Ticker::start(period, move || ticks.commit()) else {
        EnvoyLog.log(Level::Error, "keygate: cannot start the key-set sync's thread");
        return None;
    };
    Some(Configured { filter, ticker: Some(ticker), scheduler: Some(scheduler) })
}

// ---- Event hooks (implemented by keygate) ---------------------------------------------------------

/// `envoy_dynamic_module_on_program_init`: once, when Envoy loads the module. Returns the ABI
/// version (null would make Envoy unload the module).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    guarded(ptr::null, || ABI_VERSION_C.as_ptr().cast())
}

/// `envoy_dynamic_module_on_http_filter_config_new`: compiles one filter configuration. Null
/// makes Envoy refuse the configuration.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    filter_config_envoy_ptr: ConfigEnvoyPtr,
    name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> ConfigModulePtr {
    guarded(
        || {
            EnvoyLog.log(Level::Error, "keygate: internal error while reading the configuration");
            ptr::null()
        },
        || {
            // SAFETY: R1, both buffers are Envoy's and valid until this hook returns; they are
            // not kept.
            let (name, text) = unsafe { (envoy_bytes(name.ptr, name.length), envoy_bytes(config.ptr, config.length)) };
            match filter::configure(name, text, &mut ConfigHandle(filter_config_envoy_ptr))
                .and_then(|filter| start_ticks(filter_config_envoy_ptr, filter))
            {
                Some(configured) => Box::into_raw(Box::new(configured)).cast_const().cast(),
                None => ptr::null(),
            }
        },
    )
}

/// `envoy_dynamic_module_on_http_filter_config_destroy`.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(filter_config_ptr: ConfigModulePtr) {
    guarded(
        || (),
        || {
            if !filter_config_ptr.is_null() {
                // SAFETY: R4, the pointer came from Box::into_raw in config_new and Envoy destroys
                // it once, after its last stream: nothing reads it afterwards. Dropping it joins
                // its ticker thread before anything that thread uses is freed; an event it
                // committed meanwhile finds the configuration gone and is dropped by Envoy.
                drop(unsafe { Box::from_raw(filter_config_ptr.cast_mut().cast::<Configured>()) });
            }
        },
    );
}

/// `envoy_dynamic_module_on_http_filter_new`: a stream's state, which remembers the verdict on
/// its headers for its trailers (one small allocation per request, freed by
/// `on_http_filter_destroy`). Null (only if this panicked) makes every hook of the stream refuse
/// it.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_new(
    filter_config_ptr: ConfigModulePtr,
    _filter_envoy_ptr: FilterEnvoyPtr,
) -> FilterModulePtr {
    guarded(ptr::null, || {
        let state = StreamState { config: filter_config_ptr, request: Request::default() };
        Box::into_raw(Box::new(state)).cast_const().cast()
    })
}

/// `envoy_dynamic_module_on_http_filter_request_headers`: the request path.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: FilterModulePtr,
    _end_of_stream: bool,
) -> Status {
    // SAFETY: R8 and R5, the pointers of the running stream hook.
    unsafe {
        on_stream(filter_envoy_ptr, filter_module_ptr, |request, filter, stream| request.on_headers(filter, stream))
    }
}

/// `envoy_dynamic_module_on_http_filter_request_trailers`: an allowed request's trailers lose
/// every trailer named like a header keygate reads or sets; a refused request's stay stopped.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_trailers(
    filter_envoy_ptr: FilterEnvoyPtr,
    filter_module_ptr: FilterModulePtr,
) -> Status {
    // SAFETY: R8 and R5, the pointers of the running stream hook.
    unsafe {
        on_stream(filter_envoy_ptr, filter_module_ptr, |request, filter, stream| request.on_trailers(filter, stream))
    }
}

/// `envoy_dynamic_module_on_http_filter_config_scheduled`: a tick of the key-set sync, on the main
/// thread.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    filter_config_envoy_ptr: ConfigEnvoyPtr,
    filter_config_ptr: ConfigModulePtr,
    _event_id: u64,
) {
    guarded(
        || EnvoyLog.log(Level::Error, "keygate: internal error in the key-set sync's tick"),
        || {
            // SAFETY: R4 and R7, the module pointer of a configuration Envoy has not destroyed.
            if let Some(configured) = unsafe { configured(filter_config_ptr) } {
                let handle = ConfigHandle(filter_config_envoy_ptr);
                configured.filter.on_tick(&handle, &mut ConfigHandle(filter_config_envoy_ptr));
                configured.filter.on_usage_tick(&handle, &mut ConfigHandle(filter_config_envoy_ptr));
            }
        },
    );
}

/// `envoy_dynamic_module_on_http_filter_config_http_callout_done`: an answer of the key-set
/// endpoint, on the main thread.
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
#[allow(clippy::too_many_arguments)] // the ABI's
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    filter_config_envoy_ptr: ConfigEnvoyPtr,
    filter_config_ptr: ConfigModulePtr,
    callout_id: u64,
    result: CalloutResult,
    headers: *mut EnvoyHttpHeader,
    headers_size: usize,
    body_chunks: *mut EnvoyBuffer,
    body_chunks_size: usize,
) {
    guarded(
        || EnvoyLog.log(Level::Error, "keygate: internal error reading a key-set answer"),
        || {
            // SAFETY: R4 and R7, as in the scheduled hook.
            let Some(configured) = (unsafe { configured(filter_config_ptr) }) else { return };
            // SAFETY: R1, the header array and the body chunks are Envoy's, valid for their sizes
            // until this hook returns (null when there are none), and not kept.
            let (headers, chunks) =
                unsafe { (envoy_slice(headers, headers_size), envoy_slice(body_chunks, body_chunks_size)) };
            let headers: Vec<(&[u8], &[u8])> = headers
                .iter()
                // SAFETY: R1, each entry points into Envoy's answer, valid until the hook returns.
                .map(|h| unsafe { (envoy_bytes(h.key_ptr, h.key_length), envoy_bytes(h.value_ptr, h.value_length)) })
                .collect();
            // SAFETY: R1, as above.
            let chunks: Vec<&[u8]> = chunks.iter().map(|c| unsafe { envoy_bytes(c.ptr, c.length) }).collect();
            let answer = CalloutAnswer::new(result == CALLOUT_SUCCESS, &headers, chunks);
            let handle = ConfigHandle(filter_config_envoy_ptr);
            if configured.filter.on_usage_answer(callout_id, &answer, &mut ConfigHandle(filter_config_envoy_ptr)) {
                return;
            }
            configured.filter.on_answer(
                callout_id,
                &answer,
                answer.body_size(),
                &handle,
                &mut ConfigHandle(filter_config_envoy_ptr),
            );
        },
    );
}

/// An array Envoy owns.
///
/// # Safety
/// `ptr` is null or points at `length` initialised values that outlive `'a` (R1).
unsafe fn envoy_slice<'a, T>(ptr: *const T, length: usize) -> &'a [T] {
    if ptr.is_null() || length == 0 {
        return &[];
    }
    // SAFETY: the caller's contract.
    unsafe { std::slice::from_raw_parts(ptr, length) }
}

// The hooks below are required by Envoy 1.40.0 (a module that lacks one is refused) and do
// nothing for keygate: the body and the response pass unchanged, and keygate starts no callout,
// stream or scheduled event from a stream, so those never fire.

/// `envoy_dynamic_module_on_http_filter_request_body`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_request_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: bool,
) -> Status {
    CONTINUE
}

/// `envoy_dynamic_module_on_http_filter_response_headers`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: bool,
) -> Status {
    CONTINUE
}

/// `envoy_dynamic_module_on_http_filter_response_body`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_body(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _: bool,
) -> Status {
    CONTINUE
}

/// `envoy_dynamic_module_on_http_filter_response_trailers`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_response_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) -> Status {
    CONTINUE
}

/// `envoy_dynamic_module_on_http_filter_stream_complete`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(_: FilterEnvoyPtr, _: FilterModulePtr) {}

/// `envoy_dynamic_module_on_http_filter_destroy`: frees the stream's state (its configuration is
/// `on_http_filter_config_destroy`'s to free).
///
/// # Safety
/// Called by Envoy only, under the ABI's rules above.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(filter_module_ptr: FilterModulePtr) {
    guarded(
        || (),
        || {
            if !filter_module_ptr.is_null() {
                // SAFETY: R8, the pointer came from Box::into_raw in on_http_filter_new, and Envoy
                // destroys it once, after the stream's last hook: nothing reads it afterwards.
                drop(unsafe { Box::from_raw(filter_module_ptr.cast_mut().cast::<StreamState>()) });
            }
        },
    );
}

/// `envoy_dynamic_module_on_http_filter_http_callout_done`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _callout_id: u64,
    _result: u32,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _body_chunks: *mut EnvoyBuffer,
    _body_chunks_size: usize,
) {
}

/// `envoy_dynamic_module_on_http_filter_http_stream_headers`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_headers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _headers: *mut EnvoyHttpHeader,
    _headers_size: usize,
    _end_stream: bool,
) {
}

/// `envoy_dynamic_module_on_http_filter_http_stream_data`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_data(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _data: *const EnvoyBuffer,
    _data_count: usize,
    _end_stream: bool,
) {
}

/// `envoy_dynamic_module_on_http_filter_http_stream_trailers`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_trailers(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _trailers: *mut EnvoyHttpHeader,
    _trailers_size: usize,
) {
}

/// `envoy_dynamic_module_on_http_filter_http_stream_complete`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_complete(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
) {
}

/// `envoy_dynamic_module_on_http_filter_http_stream_reset` (`reason`: a
/// `envoy_dynamic_module_type_http_stream_reset_reason`).
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_http_stream_reset(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
    _stream_id: u64,
    _reason: u32,
) {
}

/// `envoy_dynamic_module_on_http_filter_scheduled`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(_: FilterEnvoyPtr, _: FilterModulePtr, _event_id: u64) {
}

/// `envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}

/// `envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark`.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(
    _: FilterEnvoyPtr,
    _: FilterModulePtr,
) {
}
