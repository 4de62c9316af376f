//! The benchmark's floor for wasm: a proxy-wasm HTTP filter that does only the work keygate's
//! contract mandates on an accepted request, and nothing else. It reads `authorization` once,
//! takes the `Bearer ` token, hashes it with SHA-256, looks the digest up in a map built from its
//! plugin configuration, removes `authorization` and sets three identity headers (`x-org-id`,
//! `x-api-key-id`, `x-api-key-scopes`); an unknown or missing key gets a bare `401`.
//!
//! No key format, routes, scopes, binding, expiry, metrics or logs on the request path: keygate's
//! CPU per request is compared with this filter's, so the ratio shows what keygate's policy costs
//! on top of the least any wasm filter doing the same edits must spend.
//!
//! Configuration: a JSON list of keygate's key records (`{"id", "hash", "org", "scopes", ...}`,
//! the `keys` of keygate's configuration); fields it does not use, such as `attributes`, are
//! ignored.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::rc::Rc;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Warn);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(FloorRoot::default()) });
}}

/// One key record as the configuration holds it.
#[derive(Deserialize)]
struct RawKey {
    id: String,
    /// SHA-256 of the key, 64 hex characters.
    hash: String,
    org: String,
    #[serde(default)]
    scopes: Vec<String>,
}

/// The identity headers' values for one key, ready to send.
struct Identity {
    id: String,
    org: String,
    scopes: String,
}

type Keys = HashMap<[u8; 32], Identity>;

/// `Some` digest if `hex` is 64 hex characters.
fn digest_from_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16);
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (nibble(*pair.first()?)?, nibble(*pair.get(1)?)?);
        *byte = (hi * 16 + lo) as u8;
    }
    Some(out)
}

fn compile(text: &[u8]) -> Result<Keys, String> {
    let raw: Vec<RawKey> = serde_json::from_slice(text).map_err(|e| format!("configuration: {e}"))?;
    let mut keys = Keys::with_capacity(raw.len());
    for (i, k) in raw.into_iter().enumerate() {
        let digest = digest_from_hex(&k.hash).ok_or(format!("[{i}].hash: expected 64 hex characters"))?;
        keys.insert(digest, Identity { id: k.id, org: k.org, scopes: k.scopes.join(" ") });
    }
    Ok(keys)
}

#[derive(Default)]
struct FloorRoot {
    keys: Rc<Keys>,
}

impl Context for FloorRoot {}

impl RootContext for FloorRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let text = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(bytes) => bytes.unwrap_or_default(),
            Err(status) => {
                log::error!("floor: cannot read the plugin configuration: {status:?}");
                return false;
            }
        };
        match compile(&text) {
            Ok(keys) => {
                self.keys = Rc::new(keys);
                true
            }
            Err(e) => {
                log::error!("floor: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Floor { keys: Rc::clone(&self.keys) }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Floor {
    keys: Rc<Keys>,
}

impl Context for Floor {}

/// Answers `status` with no body and stops the request; a host error here leaves the request
/// paused, never let through.
fn refuse(status: u32) -> Action {
    if let Err(e) = hostcalls::send_http_response(status, vec![], None) {
        log::error!("floor: cannot send the {status} reply: {e:?}");
    }
    Action::Pause
}

impl HttpContext for Floor {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let authorization = match hostcalls::get_map_value(MapType::HttpRequestHeaders, "authorization") {
            Ok(value) => value,
            Err(_) => return refuse(500),
        };
        let identity = authorization
            .as_deref()
            .and_then(|value| value.strip_prefix("Bearer "))
            .and_then(|token| self.keys.get(&<[u8; 32]>::from(Sha256::digest(token.as_bytes()))));
        let Some(identity) = identity else { return refuse(401) };
        let edits =
            [("x-org-id", &identity.org), ("x-api-key-id", &identity.id), ("x-api-key-scopes", &identity.scopes)];
        if hostcalls::remove_map_value(MapType::HttpRequestHeaders, "authorization").is_err() {
            return refuse(500);
        }
        for (name, value) in edits {
            if hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value)).is_err() {
                return refuse(500);
            }
        }
        Action::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_compile_to_digests_and_joined_scopes() {
        let hash = "ab".repeat(32);
        let text =
            format!(r#"[{{"id":"k1","hash":"{hash}","org":"o1","scopes":["a:read","b:write"],"attributes":{{}}}}]"#);
        let keys = compile(text.as_bytes()).unwrap();
        let identity = keys.get(&[0xab; 32]).unwrap();
        assert_eq!(
            (identity.id.as_str(), identity.org.as_str(), identity.scopes.as_str()),
            ("k1", "o1", "a:read b:write")
        );
    }

    #[test]
    fn a_bad_hash_names_its_record() {
        let text = r#"[{"id":"k1","hash":"xyz","org":"o1"}]"#;
        assert_eq!(compile(text.as_bytes()).err().unwrap(), "[0].hash: expected 64 hex characters");
    }
}
