//! keygate as a proxy-wasm filter: the host glue around [`keygate_core`], which decides.
//!
//! [`filter`] reads the configuration, gathers each request's view and acts on the core's decision,
//! and forwards ticks and the key-set endpoint's answers to the core's sync; [`host`] implements
//! the host traits that sync runs against; [`metrics`] defines the stats and logs and counts what
//! the sync reports. keygate never logs, counts or echoes a presented key.

pub mod filter;
pub mod host;
pub mod metrics;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(filter::Root::default())
    });
}}
