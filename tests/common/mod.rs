//! Integration-test harness: a recording upstream, a real Envoy, and clients that send hostile
//! requests exactly as written. Used by `tests/*.rs` through `mod common;`.
//!
//! ```ignore
//! let upstream = Upstream::start();
//! let envoy = Envoy::start(&EnvoyOptions::new(Some(r#"{"keys": []}"#), upstream.port()));
//! let reply = get(envoy.port(), Proto::Http2, "/v1/x", &[("x-api-key", "k")]);
//! assert_eq!(reply.status, 401);
//! assert!(upstream.requests().is_empty());
//! assert_eq!(envoy.stat("wasmcustom.keygate.denied"), Some(1)); // whatever the filter names it
//! ```
//!
//! # Binaries
//!
//! Envoy is `$ENVOY`, else `<repo>/.venv/bin/envoy` (`make envoy`); the filter is
//! `$KEYGATE_WASM`, else `<repo>/target/wasm32-wasip1/release/keygate.wasm` (`make build`).
//! A missing one is a panic that says so. The wasm is needed only when a wasm filter is configured.
//!
//! # Envoy processes
//!
//! Each [`Envoy`] runs with `--disable-hot-restart --concurrency N -l debug`, listener and admin
//! on 127.0.0.1 with OS-picked ports, working directory = the repository root, and its files
//! (`config.*`, `envoy.log`, `stdio.log`, `admin-address`) in
//! `<target>/tmp/envoy/<test-pid>-<n>/`. Drop kills (SIGKILL) and reaps it and removes that
//! directory, unless the thread is panicking (then the directory is kept and printed). Envoy also
//! gets `PR_SET_PDEATHSIG = SIGKILL`, set from a spawner thread that lives as long as the test
//! binary, so no Envoy outlives the test process even if that is killed, and an Envoy kept in a
//! `static` (shared between tests) dies with the process.
//!
//! Envoy flushes its log file every 100 ms (`--file-flush-interval-msec 100`):
//! [`Envoy::wait_for_log`] waits for a line to appear, [`Envoy::flushed_log`] waits for the
//! flush before an assertion that something is absent.
//!
//! At debug level Envoy itself writes every request's headers (credentials included) and the
//! whole listener configuration (the plugin configuration included) into its log: to check that
//! keygate never logs a secret, look at [`Envoy::wasm_log`], not the whole [`Envoy::log`].
//!
//! # Clients
//!
//! [`send`] / [`get`] / [`try_send`] open a fresh connection per request. HTTP/1.1 writes the
//! request line and headers as given (a `host` is added unless given); [`raw_http1`] writes any
//! bytes. HTTP/2 is h2c with prior knowledge through the `h2` crate: header names are lowercased,
//! `host` becomes `:authority`, and a path the `http` crate would alter or refuses (a `#`, a
//! space, no leading `/`) makes `try_send` return `Err` instead of sending something else.
//! [`try_send_with_trailers`] ends a request with trailers (a chunked HTTP/1.1 message, or a last
//! HEADERS frame); the upstream records a chunked request's trailers ([`Recorded::trailers`]),
//! which Envoy forwards only to a cluster with `enable_trailers` (tests/trailers.rs sets it).
//!
//! # Envoy's own behaviour, as observed (1.40, no filter, `normalize_path: false`)
//!
//! - Paths such as `/a/../b`, `/a//b`, `/a/%2e%2e/b`, `/a/%2F/b`, `/a\b` reach the filters and the
//!   upstream unchanged. Over HTTP/1.1 Envoy itself answers 400 to a fragment (`/a#f`), a raw
//!   non-ASCII byte in the path, a path without a leading `/`, a NUL in a header value, a space
//!   before a header's colon; 426 to HTTP/1.0. An absolute-form target
//!   (`GET http://other/p`) becomes path `/p` with `host: other`.
//! - Repeated *inline* headers (`authorization`, `host`, `user-agent`, ...) are joined into one
//!   value with a bare comma (`Bearer a,Bearer b`) over HTTP/1.1 and HTTP/2 alike; other headers
//!   (`x-api-key`) stay separate entries. HTTP/2 `cookie` crumbs are joined with `; `.
//! - Tabs and UTF-8 inside header values pass; obs-fold is unfolded to a space.
//!
//! # Recipe files (`Envoy::start_config_file`)
//!
//! A shipped, hand-written Envoy configuration (e.g. `envoy/recipes/*.yaml`) is runnable both by
//! a person (`envoy -c envoy/recipes/x.yaml` from the repository root) and by the tests, because
//! it uses these literal tokens, which the harness replaces textually before starting Envoy:
//!
//! | token in the file (YAML, or the same in JSON with a quoted key)  | replaced with               | must appear   |
//! |------------------------------------------------------------------|-----------------------------|---------------|
//! | `port_value: 10000` (the listener)                               | `port_value: 0` (OS-picked) | exactly once  |
//! | `port_value: 9901` (the admin interface)                         | `port_value: 0` (OS-picked) | exactly once  |
//! | `port_value: 10001` (the upstream cluster's endpoint)            | the recording upstream port | at least once |
//! | `filename: target/wasm32-wasip1/release/keygate.wasm` (optionally quoted) | the wasm in use ([`wasm_path`]) | any times |
//! | `0.0.0.0` (anywhere)                                             | `127.0.0.1`                 | any times     |
//! | `path: /dev/stdout` (an access log)                              | `<instance dir>/access.log` ([`Envoy::access_log`]) | any times |
//!
//! So a recipe listens on 0.0.0.0:10000 (or 127.0.0.1:10000), has its admin on port 9901, sends
//! to an upstream at 127.0.0.1:10001, loads the wasm by the path relative to the repository
//! root, and writes an access log, if it has one, to standard output. No other port number may be spelled `port_value: 10000` / `9901`. A missing or repeated
//! token makes `try_start_config_file` return `Err` naming it. The listener port the tests use is
//! read from the admin `/listeners`, so a recipe should have exactly one listener.
//!
//! # Key-set endpoint and run-time files
//!
//! [`KeySetServer`] (module [`keyset`]) is a key-set endpoint on 127.0.0.1 that publishes
//! manifest and shards as the README lays them out, answers conditional requests, records every
//! request and fails on demand ([`Fault`]). [`EnvoyOptions::keyset_port`] adds the cluster
//! [`KEYSET_CLUSTER`] (`keyset`) that points at it.
//!
//! [`EnvoyOptions::usage_port`] adds the cluster [`USAGE_CLUSTER`] (`usage`) for a usage receiver:
//! the real `keygate serve` ([`serve::KeygateServe`]), or a [`KeySetServer`] that takes `POST`s and
//! fails on demand.
//!
//! [`Envoy::try_start_with_files`] writes files Envoy reads at run time (an ECDS source, say)
//! into the instance directory and replaces [`envoy::INSTANCE_DIR_TOKEN`] with that directory's
//! path, in the configuration and in the files; a test then replaces a file there through
//! [`Envoy::dir`]. [`envoy::substitute_wasm`] applies the recipe convention's wasm token alone.
//!
//! # README examples
//!
//! [`readme::checked_block`] reads an example the README marks `<!-- checked: NAME -->`, for the
//! test that runs it (tests/readme.rs, tests/nginx.rs, tests/demo.rs).

// Every test file compiles this module and uses a part of it.
#![allow(dead_code, unused_imports)]
// The harness is test code: a failure to set up is a panic, as in a #[test] function.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

pub mod client;
pub mod envoy;
pub mod http1;
pub mod keyset;
pub mod readme;
pub mod scratch;
pub mod serve;
pub mod upstream;

pub use client::{get, raw_http1, send, send_body, try_raw_http1, try_send, try_send_with_trailers, Proto, Response};
pub use envoy::{
    envoy_binary, keygate_binary, repo_root, wasm_path, Envoy, EnvoyOptions, KEYSET_CLUSTER, USAGE_CLUSTER,
};
pub use keyset::{Fault, KeySetRequest, KeySetServer, Publication, MANIFEST_PATH};
pub use upstream::{Recorded, Upstream, UPSTREAM_BODY};
