//! keygate as an Envoy dynamic module: `libkeygate.so`, loaded by
//! `envoy.filters.http.dynamic_modules` as the module `keygate` with the HTTP filter `keygate`. The
//! same core decides as in the wasm filter; only the host differs.
//!
//! [`ffi`] is Envoy's C ABI (the declarations keygate uses, the exported event hooks, and every
//! `unsafe` of the crate); [`filter`] is the safe glue around [`keygate_core`]: it compiles the
//! configuration, gathers a request's headers, asks the core's one decision and carries it out.
//! A live `key_set` is synced on the main thread by the core's sync and read by every worker from
//! one store in process memory ([`live`]).
//! keygate never logs, counts or echoes a presented key.

// The FFI module needs Envoy's symbols to link: the host unit tests exercise the safe glue through
// its traits instead (filter_tests.rs), and tests/native.rs runs the module in Envoy.
#[cfg(not(test))]
pub mod ffi;
pub mod filter;
/// The fuzz target's entry point (fuzz/fuzz_targets/native.rs compiles it on its own); here only
/// for replaying the inputs it saved.
#[cfg(test)]
mod fuzzing;
pub mod live;
pub mod usage;

#[cfg(test)]
mod fake_host;
