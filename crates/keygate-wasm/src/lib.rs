//! keygate as a proxy-wasm filter: the host glue around [`keygate_core`], which decides.
//!
//! [`filter`] reads the configuration, gathers each request's view, acts on the core's decision and
//! performs the key-set sync's host calls. keygate never logs, counts or echoes a presented key.

pub mod filter;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Trace);
    proxy_wasm::set_root_context(|_| -> Box<dyn proxy_wasm::traits::RootContext> {
        Box::new(filter::Root::default())
    });
}}
