//! `keygate`: makes and manages API keys for the keygate Envoy filter, and checks its configuration.
//!
//! It shares the filter's code for key records, configuration and the live key-set layout
//! (`keygate-core`), so what it accepts is exactly what the filter accepts. It never stores a key,
//! only its SHA-256, and prints a key exactly once: on standard output, when `keygate new` or
//! `keygate rotate` makes it. `keygate serve` serves a published key set and keeps the usage
//! reports filters send.
//!
//! Output goes to standard output; errors are one line on standard error, `keygate: …`. Exit
//! status: 0 success, 1 failure (or problems found by `check`), 2 wrong usage.

#[cfg(not(target_arch = "wasm32"))]
mod args;
#[cfg(not(target_arch = "wasm32"))]
mod check;
#[cfg(not(target_arch = "wasm32"))]
mod clock;
#[cfg(not(target_arch = "wasm32"))]
mod commands;
#[cfg(not(target_arch = "wasm32"))]
mod envoy;
#[cfg(not(target_arch = "wasm32"))]
mod help;
#[cfg(not(target_arch = "wasm32"))]
mod json;
#[cfg(not(target_arch = "wasm32"))]
mod keyset;
#[cfg(not(target_arch = "wasm32"))]
mod report;
#[cfg(not(target_arch = "wasm32"))]
mod serve;
#[cfg(not(target_arch = "wasm32"))]
mod shards;

// The filter is the keygate-wasm library built for wasm32, which `make build` puts at
// target/wasm32-wasip1/release/keygate.wasm; a wasm32 build of this binary would have the same file
// name and overwrite it. So building every crate for wasm32 stops here, with the command that builds
// the filter alone.
#[cfg(target_arch = "wasm32")]
compile_error!(
    "the keygate command-line tool runs on the host; build the filter alone with \
     `cargo build --release -p keygate-wasm --lib --target wasm32-wasip1` (make build)"
);
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    match commands::run(&args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(fail) => fail.report(),
    }
}
