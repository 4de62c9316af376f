//! The README's examples, checked so they cannot drift from the code: the configuration
//! reference's example and the `key_set` and `usage` examples compile as the filter compiles a
//! configuration, the usage report example reads as a receiver reads one, and the publishing
//! command of "Key distribution" writes a key set that the filter's manifest and shard checks load
//! in full.
//!
//! A checked block is a fenced block with an HTML comment on the line before it,
//! `<!-- checked: NAME … -->`, which a reader of the rendered README does not see
//! ([`common::readme::checked_block`]). A marker that is missing, or not followed by a fence, fails
//! with the marker's name. tests/nginx.rs checks the nginx example the same way, by serving with it,
//! tests/demo.rs the live demo's walkthrough, by running it.

// Test code: a failed step is a panic, as in a #[test] function.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::readme::{checked_block, readme};
use common::scratch::Scratch;
use keygate_core::live::{parse_manifest, parse_shard};
use keygate_core::plugin::Plugin;
use keygate_core::usage::Report;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The `keygate` binary (see [`common::keygate_binary`]).
static BIN: std::sync::LazyLock<PathBuf> = std::sync::LazyLock::new(common::keygate_binary);

#[test]
fn the_configuration_reference_example_compiles() {
    let (text, language) = checked_block(&readme(), "configuration");
    assert_eq!(language, "json", "the configuration example's fence");
    let plugin = Plugin::from_json(text.as_bytes())
        .unwrap_or_else(|e| panic!("README.md's configuration example is refused: {e}\n{text}"));
    assert_eq!(plugin.policy.keys.len(), 1, "the example's keys");
}

#[test]
fn the_key_set_example_compiles_as_a_configuration_member() {
    let (text, language) = checked_block(&readme(), "key_set");
    assert_eq!(language, "json", "the key_set example's fence");
    let configuration = format!("{{{text}}}");
    Plugin::from_json(configuration.as_bytes())
        .unwrap_or_else(|e| panic!("README.md's key_set example is refused: {e}\n{configuration}"));
}

#[test]
fn the_usage_example_compiles_as_a_configuration_member() {
    let (text, language) = checked_block(&readme(), "usage");
    assert_eq!(language, "json", "the usage example's fence");
    let configuration = format!("{{{text}}}");
    let plugin = Plugin::from_json(configuration.as_bytes())
        .unwrap_or_else(|e| panic!("README.md's usage example is refused: {e}\n{configuration}"));
    assert!(plugin.usage.is_some(), "the usage example configures no usage");
}

#[test]
fn the_usage_report_example_reads_as_a_report() {
    let (text, language) = checked_block(&readme(), "usage_report");
    assert_eq!(language, "json", "the usage report example's fence");
    let report = Report::parse(text.as_bytes())
        .unwrap_or_else(|e| panic!("README.md's usage report example is refused: {e}\n{text}"));
    assert_eq!(Report::parse(&report.to_json()).as_ref(), Ok(&report), "the report as keygate writes it");
}

/// Every file named `name` under `dir`.
fn find(dir: &Path, name: &str, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            find(&path, name, out);
        } else if path.file_name().is_some_and(|n| n == name) {
            out.push(path);
        }
    }
}

#[test]
fn the_publishing_command_writes_a_key_set_the_filter_loads() {
    let (script, language) = checked_block(&readme(), "publish");
    assert_eq!(language, "sh", "the publishing example's fence");
    let s = Scratch::new("publish");
    // keys.json, as `keygate new --keys` makes it: three keys.
    let mut ids = BTreeSet::new();
    for org in ["org_1", "org_2", "org_3"] {
        let out =
            Command::new(&*BIN).args(["new", "--org", org, "--keys", "keys.json"]).current_dir(&s.0).output().unwrap();
        assert!(out.status.success(), "keygate new: {}", String::from_utf8_lossy(&out.stderr));
        let key = String::from_utf8(out.stdout).unwrap();
        ids.insert(key.split('_').nth(2).unwrap().to_string());
    }

    // The README's commands, with this build's keygate first on PATH.
    let bin_dir = BIN.parent().unwrap();
    let path = std::env::join_paths(
        std::iter::once(bin_dir.to_path_buf())
            .chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let out = Command::new("sh").args(["-eu", "-c", &script]).env("PATH", path).current_dir(&s.0).output().unwrap();
    assert!(
        out.status.success(),
        "README.md's publishing commands failed ({}):\n{script}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    let mut manifests = Vec::new();
    find(&s.0, "manifest.json", &mut manifests);
    assert_eq!(manifests.len(), 1, "README.md's publishing commands wrote no manifest.json, or several: {manifests:?}");
    let manifest_path = &manifests[0];
    let manifest = parse_manifest(&fs::read(manifest_path).unwrap())
        .unwrap_or_else(|e| panic!("{}: the filter refuses it: {e}", manifest_path.display()));
    let dir = manifest_path.parent().unwrap();
    let mut loaded = BTreeSet::new();
    for shard in &manifest.shards {
        let body = fs::read(dir.join(&shard.path)).unwrap_or_else(|e| panic!("{}: {e}", shard.path));
        for (_, key) in parse_shard(shard, &body).unwrap_or_else(|e| panic!("the filter refuses a shard: {e}")) {
            assert!(loaded.insert(key.id.clone()), "key {} in two shards", key.id);
        }
    }
    assert_eq!(loaded, ids, "the published set holds every key of keys.json, once");
}
