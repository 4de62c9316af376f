//! The benchmark's floor: a proxy-wasm HTTP filter that does the least an authentication filter
//! must, read the `authorization` header once, and lets every request through. keygate's CPU per
//! request is compared with this filter's, so the ratio shows what keygate adds on top of merely
//! being a wasm filter.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(NoopRoot) });
}}

struct NoopRoot;

impl Context for NoopRoot {}

impl RootContext for NoopRoot {
    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Noop))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Noop;

impl Context for Noop {}

impl HttpContext for Noop {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        // One host call, as an authentication filter's least work; the value is not inspected.
        let _authorization = self.get_http_request_header("authorization");
        Action::Continue
    }
}
