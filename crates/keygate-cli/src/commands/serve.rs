//! `keygate serve`: the command line of [`crate::serve`].

use super::{no_positionals, usage, Fail};
use crate::args::Parsed;
use crate::serve::{self, Options};
use std::path::PathBuf;

/// Where `keygate serve` listens unless told: loopback only.
pub(super) const DEFAULT_LISTEN: &str = "127.0.0.1:8089";

pub(super) fn serve(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("serve");
    no_positionals(p, "; serve takes only options").map_err(&usage)?;
    let keys = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let usage_dir = PathBuf::from(p.required_os("--usage-dir").map_err(&usage)?);
    let listen = p.text("--listen").map_err(&usage)?.unwrap_or_else(|| DEFAULT_LISTEN.to_string());
    let listen = listen.parse().map_err(|_| {
        usage(format!("--listen: expected an address and port such as {DEFAULT_LISTEN}, got {listen:?}"))
    })?;
    serve::run(&Options { keys, usage_dir, listen }).map_err(Fail::Error)
}
