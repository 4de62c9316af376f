//! keygate: an API-key authentication filter for Envoy and Istio, built on proxy-wasm.
//!
//! Everything that decides is plain Rust, tested on the host with no Envoy: credential extraction
//! ([`credential`]), key records and lookup ([`keys`]), path readings and route patterns ([`routes`]),
//! scopes ([`scopes`]), replies ([`reply`]), configuration compilation ([`config`]) and the one decision
//! ([`policy`]). [`filter`] is the thin layer that talks to the host.
//!
//! keygate never logs, counts or echoes a presented key: a key is identified by its record id.

pub mod config;
pub mod credential;
pub mod filter;
/// Fuzz entry points; native only, never in the filter.
#[cfg(not(target_arch = "wasm32"))]
pub mod fuzzing;
pub mod jsonpath;
pub mod keys;
pub mod live;
pub mod policy;
pub mod reply;
pub mod routes;
pub mod scopes;
pub mod time;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(filter::Root::default())
    });
}}
