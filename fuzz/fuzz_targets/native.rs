//! The native module's safe half (crates/keygate-native: `filter.rs`, `live.rs`) through its fuzz
//! entry point (`fuzzing.rs`). That crate is a cdylib whose FFI needs Envoy's symbols to link, so
//! its host-free modules are compiled here as this target's own, as its unit tests compile them:
//! without `ffi`.
#![no_main]
// The whole safe half is compiled; the target drives part of it.
#![allow(dead_code)]
// filter.rs's `panic-probe` is the native crate's feature; this target has no features.
#![allow(unexpected_cfgs)]

#[path = "../../crates/keygate-native/src/filter.rs"]
mod filter;
#[path = "../../crates/keygate-native/src/fuzzing.rs"]
mod fuzzing;
#[path = "../../crates/keygate-native/src/live.rs"]
mod live;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzzing::native(data));
