//! keygate-core: everything keygate decides, as plain Rust that never talks to a host.
//!
//! Credential extraction ([`credential`]), key records and lookup ([`keys`]), path readings and route
//! patterns ([`routes`]), scopes ([`scopes`]), replies ([`reply`]), configuration compilation
//! ([`config`]) into a [`plugin::Plugin`], the one decision ([`policy`]), live key sets ([`live`]) and usage reporting ([`usage`]). The hosts (the proxy-wasm
//! filter, the CLI) depend on this crate; it depends on none of them, and on no host API.
//!
//! keygate never logs, counts or echoes a presented key: a key is identified by its record id.

pub mod checks;
pub mod config;
pub mod credential;
pub mod error;
/// Fuzz entry points; native only, never in the filter.
#[cfg(not(target_arch = "wasm32"))]
pub mod fuzzing;
pub mod json;
pub mod jsonpath;
pub mod keys;
pub mod layout;
pub mod live;
pub mod plugin;
pub mod policy;
pub mod reply;
pub mod routes;
pub mod scopes;
pub mod time;
pub mod usage;
