//! The crate graph is the architecture: keygate-core reaches no host API through any dependency, and
//! its modules import each other without a cycle. Both are read from the sources and `Cargo.lock`,
//! so a change that breaks either fails here, in milliseconds.

// Test code: a failed step is a panic, as in a #[test] function.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const HOST_CRATES: [&str; 2] = ["proxy-wasm", "proxy_wasm"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its module path (`keys::record`).
fn modules(dir: &Path, prefix: &str, out: &mut Vec<(String, PathBuf)>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let stem = path.file_stem().unwrap().to_str().unwrap().to_string();
        if path.is_dir() {
            modules(&path, &format!("{prefix}{stem}::"), out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let name = match stem.as_str() {
                "mod" => prefix.trim_end_matches("::").to_string(),
                _ => format!("{prefix}{stem}"),
            };
            out.push((name, path));
        }
    }
}

/// The code of a module: without its `#[cfg(test)]` tail (tests may reach anywhere) and without
/// comments (a doc link is not an import).
fn non_test(text: &str) -> String {
    let code = text.find("#[cfg(test)]").map_or(text, |at| &text[..at]);
    code.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect()
}

/// The modules a source refers to as `crate::a::b`, as the longest known module path.
fn references(text: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (at, _) in text.match_indices("crate::") {
        let rest = &text[at + "crate::".len()..];
        let path: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        let found = (1..=parts.len()).rev().map(|n| parts[..n].join("::")).find(|m| known.contains(m));
        if let Some(m) = found {
            out.insert(m);
        }
    }
    out
}

#[test]
fn core_modules_import_each_other_without_a_cycle() {
    let mut files = Vec::new();
    modules(&src(), "", &mut files);
    let known: BTreeSet<String> = files.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, path) in &files {
        if module.ends_with("_tests") || module.ends_with("_props") || module == "lib" {
            continue;
        }
        let text = fs::read_to_string(path).unwrap();
        let mut deps = references(&non_test(&text), &known);
        deps.remove(module);
        graph.insert(module.clone(), deps);
    }
    assert!(graph.len() > 10, "read too few modules: {graph:?}");
    // Depth-first search; a module met again while on the stack closes a cycle.
    fn visit(
        m: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        stack: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = stack.iter().position(|s| s == m) {
            panic!("import cycle: {} -> {m}", stack[at..].join(" -> "));
        }
        stack.push(m.to_string());
        for d in graph.get(m).into_iter().flatten() {
            visit(d, graph, stack, done);
        }
        stack.pop();
        done.insert(m.to_string());
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

#[test]
fn cycle_finder_sees_a_cycle() {
    let known: BTreeSet<String> = ["a", "b", "keys", "keys::record"].iter().map(|s| s.to_string()).collect();
    let refs = references("use crate::keys::record::{RawKey};\nuse crate::b::thing;\n// crate::nope", &known);
    assert_eq!(refs, ["b", "keys::record"].iter().map(|s| s.to_string()).collect());
    assert_eq!(non_test("a\n  /// [`x`](crate::b)\n#[cfg(test)]\nmod tests;"), "a\n");
}

#[test]
fn core_sources_never_name_a_host_api() {
    let mut files = Vec::new();
    modules(&src(), "", &mut files);
    for (module, path) in files {
        let text = fs::read_to_string(path).unwrap();
        assert!(!text.contains("proxy_wasm") && !text.contains("hostcalls"), "{module} names a host API");
    }
}

/// The packages `root` depends on, directly or not, from `Cargo.lock` (every target and feature).
fn dependency_closure(lock: &str, root: &str) -> BTreeSet<String> {
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for package in lock.split("[[package]]").skip(1) {
        let name = package.lines().find_map(|l| l.strip_prefix("name = \"")).map(|n| n.trim_end_matches('"'));
        let Some(name) = name else { continue };
        let list = package.split("dependencies = [").nth(1).and_then(|d| d.split(']').next()).unwrap_or("");
        let names = list
            .lines()
            .filter_map(|l| l.trim().strip_prefix('"'))
            .map(|l| l.split([' ', '"']).next().unwrap_or("").to_string());
        deps.entry(name.to_string()).or_default().extend(names);
    }
    let mut seen = BTreeSet::new();
    let mut todo = vec![root.to_string()];
    while let Some(p) = todo.pop() {
        if seen.insert(p.clone()) {
            todo.extend(deps.get(&p).cloned().unwrap_or_default());
        }
    }
    seen
}

#[test]
fn core_and_cli_depend_on_no_host_crate() {
    let lock = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../Cargo.lock")).unwrap();
    let wasm = dependency_closure(&lock, "keygate-wasm");
    assert!(wasm.contains("proxy-wasm"), "the lock file was not read: {wasm:?}");
    for root in ["keygate-core", "keygate-cli"] {
        let closure = dependency_closure(&lock, root);
        assert!(closure.contains("keygate-core") && closure.len() > 3, "{root}: {closure:?}");
        for host in HOST_CRATES {
            assert!(!closure.contains(host), "{root} depends on {host}: {closure:?}");
        }
    }
}
