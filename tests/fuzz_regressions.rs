//! Replays every input saved under fuzz/regressions/<target>/ (crashes the fuzzers found, and seeds)
//! through the same entry points the fuzz targets run. A saved input that panics again fails here.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

/// The most one saved input may take: `make fuzz`'s `-timeout` (2 s).
const BUDGET: Duration = Duration::from_secs(2);

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions").join(target);
    let mut count = 0;
    for entry in fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_file() {
            let data = fs::read(&path).unwrap();
            let start = Instant::now();
            let outcome = std::panic::catch_unwind(|| run(&data));
            let took = start.elapsed();
            assert!(outcome.is_ok(), "fuzz input {} panics", path.display());
            // The fuzzers' budget (`make fuzz`, FUZZ_TIMEOUT), for an unoptimised build.
            assert!(took < BUDGET, "fuzz input {} took {took:?}, past the budget of {BUDGET:?}", path.display());
            count += 1;
        }
    }
    count
}

#[test]
fn saved_credential_inputs_do_not_panic() {
    assert!(replay("credential", keygate_core::fuzzing::credential) > 0);
}

#[test]
fn saved_path_inputs_do_not_panic() {
    assert!(replay("path", keygate_core::fuzzing::path) > 0);
}

#[test]
fn saved_config_inputs_do_not_panic() {
    assert!(replay("config", keygate_core::fuzzing::config) > 0);
}

#[test]
fn saved_keyset_inputs_do_not_panic() {
    assert!(replay("keyset", keygate_core::fuzzing::keyset) > 0);
}
