//! keygate in Istio (README "Using in Istio"): the OCI image `make image` builds, proven against a
//! real OCI registry on loopback, and the manifests in `envoy/istio/`, checked against the fields
//! of their CRDs and compiled by keygate's own configuration check, then run in a real Envoy
//! configured the way istiod configures a sidecar for a `WasmPlugin`.
//!
//! The registry is Debian's `docker-registry` package (the reference implementation, CNCF
//! distribution 2.8): `$DOCKER_REGISTRY`, else `target/tools/docker-registry/usr/bin/docker-registry`
//! (`make image-deps` unpacks it there), else `docker-registry` on the `PATH`. A missing registry
//! fails the test, with the command that fetches it. `python3` runs `tools/oci/*.py`.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{get, http1, repo_root, wasm_path, Envoy, EnvoyOptions, KeySetServer, Proto, Upstream, KEYSET_CLUSTER};
use keygate_core::keys::hash_key;
use keygate_core::plugin::Plugin;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// Where the Istio manifests live, relative to the repository root.
const ISTIO_DIR: &str = "envoy/istio";

// Demo keys of envoy/envoy.yaml, whose hashes the shipped manifests hold.
const VENUE_KEY: &str = "sk_live_ab12cd34_9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";
const PLATFORM_KEY: &str = "sk_live_5e6f7a8b_0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const REVOKED_KEY: &str = "sk_live_c0ffee00_deadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeefdeadbeef";
const UNKNOWN_KEY: &str = "sk_live_ab12cd34_0000000000000000000000000000000000000000000000000000000000000000";

fn hash(key: &str) -> String {
    hex::encode(hash_key(key.as_bytes()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

// =============================================================================================
// YAML, read the way the Kubernetes API server reads a manifest
//
// A small tree with line numbers, built from yaml-rust2's events (YAML 1.2). Kubernetes reads
// YAML with a YAML 1.1 flavour (`yes`, `on`, `y` are booleans, `0755` is octal), so a plain
// scalar the two readings disagree on is reported, and so is a key repeated in one map (kubectl
// refuses it; a lenient reader silently keeps one): what is checked here is what the cluster gets.

#[derive(Clone, Debug)]
enum Node {
    Map(Vec<Entry>, usize),
    Seq(Vec<Node>, usize),
    Scalar(Scalar),
}

#[derive(Clone, Debug)]
struct Entry {
    key: String,
    line: usize,
    value: Node,
}

#[derive(Clone, Debug)]
struct Scalar {
    text: String,
    plain: bool,
    line: usize,
}

impl Node {
    fn line(&self) -> usize {
        match self {
            Node::Map(_, line) | Node::Seq(_, line) => *line,
            Node::Scalar(s) => s.line,
        }
    }

    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries, _) => entries.iter().find(|e| e.key == key).map(|e| &e.value),
            _ => None,
        }
    }

    /// The value at a dotted path of map keys.
    fn at(&self, path: &str) -> Option<&Node> {
        path.split('.').try_fold(self, |node, key| node.get(key))
    }

    fn json(&self) -> Value {
        match self {
            Node::Map(entries, _) => Value::Object(entries.iter().map(|e| (e.key.clone(), e.value.json())).collect()),
            Node::Seq(items, _) => Value::Array(items.iter().map(Node::json).collect()),
            Node::Scalar(s) => scalar_json(s),
        }
    }

    fn str_at(&self, path: &str) -> Option<String> {
        self.at(path).and_then(|n| n.json().as_str().map(str::to_string))
    }
}

/// A scalar's value by the YAML 1.2 core schema: quoted is a string; plain may be null, a
/// boolean, an integer or a float.
fn scalar_json(s: &Scalar) -> Value {
    if !s.plain {
        return Value::String(s.text.clone());
    }
    let t = s.text.as_str();
    match t {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(i) = t.parse::<i64>() {
            return json!(i);
        }
    }
    let float_chars = digits.bytes().all(|b| b.is_ascii_digit() || b"._eE+-".contains(&b));
    if float_chars && digits.bytes().any(|b| b.is_ascii_digit()) && !digits.contains('_') {
        if let Ok(f) = t.parse::<f64>() {
            return json!(f);
        }
    }
    Value::String(t.to_string())
}

/// What Kubernetes' YAML 1.1 reading makes of a plain scalar, when that differs from YAML 1.2.
fn yaml11_reading(text: &str) -> Option<&'static str> {
    const BOOLEANS: [&str; 16] =
        ["y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"];
    if BOOLEANS.contains(&text) {
        return Some("a boolean");
    }
    let t = text.strip_prefix(['-', '+']).unwrap_or(text);
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'_');
    if t.len() > 1 && t.starts_with('0') && numeric(t) {
        return Some("an octal number");
    }
    if t.starts_with("0o") {
        return Some("a string, not an octal number");
    }
    if t.contains('_') && t.starts_with(|c: char| c.is_ascii_digit()) && t.split('.').all(numeric) {
        return Some("a number");
    }
    if t.contains(':') && t.split(':').all(numeric) {
        return Some("a base-60 number");
    }
    None
}

enum Frame {
    Map { line: usize, entries: Vec<Entry>, key: Option<(String, usize)> },
    Seq { line: usize, items: Vec<Node> },
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<Frame>,
    documents: Vec<Node>,
    problems: Vec<String>,
}

impl TreeBuilder {
    fn add(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.documents.push(node),
            Some(Frame::Seq { items, .. }) => items.push(node),
            Some(Frame::Map { entries, key, .. }) => match key.take() {
                None => match node {
                    Node::Scalar(s) => *key = Some((s.text, s.line)),
                    other => self.problems.push(format!("line {}: a map key that is not a string", other.line())),
                },
                Some((k, line)) => {
                    if entries.iter().any(|e| e.key == k) {
                        self.problems.push(format!("line {line}: `{k}` repeated in the same map"));
                    }
                    entries.push(Entry { key: k, line, value: node });
                }
            },
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        let line = mark.line();
        if let Event::MappingStart(_, Some(_)) | Event::SequenceStart(_, Some(_)) = &event {
            self.problems.push(format!("line {line}: YAML tags are not used in the manifests"));
        }
        match event {
            Event::MappingStart(..) => self.stack.push(Frame::Map { line, entries: Vec::new(), key: None }),
            Event::SequenceStart(..) => self.stack.push(Frame::Seq { line, items: Vec::new() }),
            Event::MappingEnd | Event::SequenceEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Map { line, entries, .. }) => Node::Map(entries, line),
                    Some(Frame::Seq { line, items }) => Node::Seq(items, line),
                    None => return,
                };
                self.add(node);
            }
            Event::Scalar(text, style, _, tag) => {
                if tag.is_some() {
                    self.problems.push(format!("line {line}: YAML tags are not used in the manifests"));
                }
                let plain = style == TScalarStyle::Plain;
                if plain {
                    if let Some(reading) = yaml11_reading(&text) {
                        self.problems.push(format!(
                            "line {line}: `{text}` is {reading} to Kubernetes: quote it if it is a string"
                        ));
                    }
                }
                self.add(Node::Scalar(Scalar { text, plain, line }));
            }
            Event::Alias(_) => self.problems.push(format!("line {line}: YAML aliases are not used in the manifests")),
            _ => {}
        }
    }
}

/// The documents of a YAML stream (empty documents dropped), or every problem found reading it.
fn read_yaml(text: &str) -> Result<Vec<Node>, Vec<String>> {
    let mut builder = TreeBuilder::default();
    if let Err(e) = Parser::new_from_str(text).load(&mut builder, true) {
        return Err(vec![format!("not YAML: {e}")]);
    }
    if !builder.problems.is_empty() {
        return Err(builder.problems);
    }
    Ok(builder
        .documents
        .into_iter()
        .filter(|d| !matches!(d, Node::Scalar(s) if s.plain && s.text.is_empty()))
        .collect())
}

// =============================================================================================
// The CRDs' fields
//
// Derived from the `openAPIV3Schema` of each CRD in istio/api `kubernetes/customresourcedefinitions.gen.yaml`
// (the CRDs istioctl installs). Paths are dotted; `[]` stands for the items of an array. The
// DestinationRule list is the part of that CRD a key-set endpoint uses (host, export, TLS per
// port): anything else is reported too, which is stricter than the cluster, never looser.

#[derive(Clone, Copy, Debug)]
enum Ty {
    /// An object; the names are its required fields.
    Object(&'static [&'static str]),
    /// An array whose items are described at `path[]`.
    Array,
    /// An array of strings.
    Strings,
    Str,
    Int,
    Bool,
    Enum(&'static [&'static str]),
    StringMap,
    IntMap,
    /// `x-kubernetes-preserve-unknown-fields`: an object the CRD does not describe further.
    Free,
}

use Ty::*;

struct Crd {
    api_version: &'static str,
    kind: &'static str,
    fields: &'static [(&'static str, Ty)],
}

/// Fields every resource has (apiVersion and kind are checked first).
const RESOURCE: &[(&str, Ty)] = &[
    ("", Object(&["apiVersion", "kind", "metadata", "spec"])),
    ("apiVersion", Str),
    ("kind", Str),
    ("metadata", Object(&["name"])),
    ("metadata.name", Str),
    ("metadata.namespace", Str),
    ("metadata.labels", StringMap),
    ("metadata.annotations", StringMap),
];

const WASM_PLUGIN: Crd = Crd {
    api_version: "extensions.istio.io/v1alpha1",
    kind: "WasmPlugin",
    fields: &[
        ("spec", Object(&["url"])),
        ("spec.failStrategy", Enum(&["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"])),
        ("spec.imagePullPolicy", Enum(&["UNSPECIFIED_POLICY", "IfNotPresent", "Always"])),
        ("spec.imagePullSecret", Str),
        ("spec.match", Array),
        ("spec.match[]", Object(&[])),
        ("spec.match[].mode", Enum(&["UNDEFINED", "CLIENT", "SERVER", "CLIENT_AND_SERVER"])),
        ("spec.match[].ports", Array),
        ("spec.match[].ports[]", Object(&["number"])),
        ("spec.match[].ports[].number", Int),
        ("spec.phase", Enum(&["UNSPECIFIED_PHASE", "AUTHN", "AUTHZ", "STATS"])),
        ("spec.pluginConfig", Free),
        ("spec.pluginName", Str),
        ("spec.priority", Int),
        ("spec.selector", Object(&[])),
        ("spec.selector.matchLabels", StringMap),
        ("spec.sha256", Str),
        ("spec.targetRef", Object(&["kind", "name"])),
        ("spec.targetRef.group", Str),
        ("spec.targetRef.kind", Str),
        ("spec.targetRef.name", Str),
        ("spec.targetRef.namespace", Str),
        ("spec.targetRefs", Array),
        ("spec.targetRefs[]", Object(&["kind", "name"])),
        ("spec.targetRefs[].group", Str),
        ("spec.targetRefs[].kind", Str),
        ("spec.targetRefs[].name", Str),
        ("spec.targetRefs[].namespace", Str),
        ("spec.type", Enum(&["UNSPECIFIED_PLUGIN_TYPE", "HTTP", "NETWORK"])),
        ("spec.url", Str),
        ("spec.verificationKey", Str),
        ("spec.vmConfig", Object(&[])),
        ("spec.vmConfig.env", Array),
        ("spec.vmConfig.env[]", Object(&["name"])),
        ("spec.vmConfig.env[].name", Str),
        ("spec.vmConfig.env[].value", Str),
        ("spec.vmConfig.env[].valueFrom", Enum(&["INLINE", "HOST"])),
    ],
};

const SERVICE_ENTRY: Crd = Crd {
    api_version: "networking.istio.io/v1",
    kind: "ServiceEntry",
    fields: &[
        ("spec", Object(&["hosts"])),
        ("spec.addresses", Strings),
        ("spec.endpoints", Array),
        ("spec.endpoints[]", Object(&[])),
        ("spec.endpoints[].address", Str),
        ("spec.endpoints[].labels", StringMap),
        ("spec.endpoints[].locality", Str),
        ("spec.endpoints[].network", Str),
        ("spec.endpoints[].ports", IntMap),
        ("spec.endpoints[].serviceAccount", Str),
        ("spec.endpoints[].weight", Int),
        ("spec.exportTo", Strings),
        ("spec.hosts", Strings),
        ("spec.location", Enum(&["MESH_EXTERNAL", "MESH_INTERNAL"])),
        ("spec.ports", Array),
        ("spec.ports[]", Object(&["number", "name"])),
        ("spec.ports[].name", Str),
        ("spec.ports[].number", Int),
        ("spec.ports[].protocol", Str),
        ("spec.ports[].targetPort", Int),
        ("spec.resolution", Enum(&["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"])),
        ("spec.subjectAltNames", Strings),
        ("spec.workloadSelector", Object(&[])),
        ("spec.workloadSelector.labels", StringMap),
    ],
};

const TLS_MODES: &[&str] = &["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"];

const DESTINATION_RULE: Crd = Crd {
    api_version: "networking.istio.io/v1",
    kind: "DestinationRule",
    fields: &[
        ("spec", Object(&["host"])),
        ("spec.exportTo", Strings),
        ("spec.host", Str),
        ("spec.workloadSelector", Object(&[])),
        ("spec.workloadSelector.matchLabels", StringMap),
        ("spec.trafficPolicy", Object(&[])),
        ("spec.trafficPolicy.tls", Object(&[])),
        ("spec.trafficPolicy.tls.caCertificates", Str),
        ("spec.trafficPolicy.tls.credentialName", Str),
        ("spec.trafficPolicy.tls.insecureSkipVerify", Bool),
        ("spec.trafficPolicy.tls.mode", Enum(TLS_MODES)),
        ("spec.trafficPolicy.tls.sni", Str),
        ("spec.trafficPolicy.tls.subjectAltNames", Strings),
        ("spec.trafficPolicy.portLevelSettings", Array),
        ("spec.trafficPolicy.portLevelSettings[]", Object(&[])),
        ("spec.trafficPolicy.portLevelSettings[].port", Object(&[])),
        ("spec.trafficPolicy.portLevelSettings[].port.number", Int),
        ("spec.trafficPolicy.portLevelSettings[].tls", Object(&[])),
        ("spec.trafficPolicy.portLevelSettings[].tls.caCertificates", Str),
        ("spec.trafficPolicy.portLevelSettings[].tls.credentialName", Str),
        ("spec.trafficPolicy.portLevelSettings[].tls.insecureSkipVerify", Bool),
        ("spec.trafficPolicy.portLevelSettings[].tls.mode", Enum(TLS_MODES)),
        ("spec.trafficPolicy.portLevelSettings[].tls.sni", Str),
        ("spec.trafficPolicy.portLevelSettings[].tls.subjectAltNames", Strings),
    ],
};

/// The kinds `envoy/istio/` may hold. No EnvoyFilter: keygate's live key set needs no singleton
/// (README "Key distribution"), so there is nothing for one to add.
const CRDS: &[&Crd] = &[&WASM_PLUGIN, &SERVICE_ENTRY, &DESTINATION_RULE];

// =============================================================================================
// Checking a manifest

fn type_of(crd: &Crd, path: &str) -> Option<Ty> {
    RESOURCE.iter().chain(crd.fields).find(|(p, _)| *p == path).map(|(_, t)| *t)
}

fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// Checks `node` against the CRD's description of `path`; `shown` is the same path with the
/// array indices filled in. Problems are `line N: shown: what`.
fn check_fields(crd: &Crd, node: &Node, path: &str, shown: &str, problems: &mut Vec<String>) {
    let Some(ty) = type_of(crd, path) else {
        problems.push(format!("line {}: {shown}: unknown field (not in the {} CRD)", node.line(), crd.kind));
        return;
    };
    let mut bad = |what: &str| problems.push(format!("line {}: {shown}: expected {what}", node.line()));
    let value = node.json();
    match (ty, node) {
        (Object(required), Node::Map(entries, _)) => {
            for e in entries {
                let (child, child_shown) = (join(path, &e.key), join(shown, &e.key));
                if type_of(crd, &child).is_some() {
                    check_fields(crd, &e.value, &child, &child_shown, problems);
                } else {
                    problems
                        .push(format!("line {}: {child_shown}: unknown field (not in the {} CRD)", e.line, crd.kind));
                }
            }
            for r in required {
                if !entries.iter().any(|e| e.key == *r) {
                    problems.push(format!(
                        "line {}: {}: required by the {} CRD",
                        node.line(),
                        join(shown, r),
                        crd.kind
                    ));
                }
            }
        }
        (Object(_), _) => bad("an object"),
        (Array, Node::Seq(items, _)) => {
            for (i, item) in items.iter().enumerate() {
                check_fields(crd, item, &format!("{path}[]"), &format!("{shown}[{i}]"), problems);
            }
        }
        (Array, _) => bad("a list"),
        (Strings, _) => {
            if !value.as_array().is_some_and(|a| a.iter().all(Value::is_string)) {
                bad("a list of strings");
            }
        }
        (Str, _) => {
            if !value.is_string() {
                bad("a string");
            }
        }
        (Int, _) => {
            if !value.is_i64() {
                bad("an integer");
            }
        }
        (Bool, _) => {
            if !value.is_boolean() {
                bad("true or false");
            }
        }
        (Enum(allowed), _) => {
            if !value.as_str().is_some_and(|v| allowed.contains(&v)) {
                bad(&format!("one of {}, got {value}", allowed.join(", ")));
            }
        }
        (StringMap, _) => {
            if !value.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
                bad("a map of strings");
            }
        }
        (IntMap, _) => {
            if !value.as_object().is_some_and(|m| m.values().all(Value::is_i64)) {
                bad("a map of integers");
            }
        }
        (Free, _) => {
            if !value.is_object() {
                bad("an object");
            }
        }
    }
}

/// The WasmPlugin CRD's validation rules beyond field types (its `x-kubernetes-validations` and
/// patterns), and what istiod does with `pluginConfig`: it becomes the JSON text of the filter's
/// configuration, which must pass keygate's own check.
fn check_wasm_plugin(doc: &Node, problems: &mut Vec<String>) {
    let line = doc.get("spec").map_or(1, Node::line);
    let targets = ["spec.selector", "spec.targetRef", "spec.targetRefs"].iter().filter(|p| doc.at(p).is_some()).count();
    if targets > 1 {
        problems.push(format!("line {line}: spec: only one of targetRefs or selector can be set"));
    }
    if let Some(url) = doc.str_at("spec.url") {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        if !["", "oci", "http", "https", "file"].contains(&scheme) {
            problems.push(format!("line {line}: spec.url: scheme must be one of oci, http, https, file"));
        }
    }
    if let Some(sha) = doc.str_at("spec.sha256") {
        let hex64 = sha.len() == 64 && sha.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !sha.is_empty() && !hex64 {
            problems.push(format!("line {line}: spec.sha256: expected 64 lowercase hex digits"));
        }
    }
    let Some(config) = doc.at("spec.pluginConfig") else {
        return;
    };
    let json = config.json();
    let mut numbers = Vec::new();
    collect_big_integers(&json, "", &mut numbers);
    for path in numbers {
        // istiod carries pluginConfig as a protobuf Struct, whose numbers are doubles.
        problems.push(format!("line {}: spec.pluginConfig{path}: an integer beyond 2^53 is rounded", config.line()));
    }
    if let Err(e) = Plugin::from_json(json.to_string().as_bytes()) {
        problems.push(format!("line {}: spec.pluginConfig: keygate refuses it: {e}", config.line()));
    }
}

fn collect_big_integers(value: &Value, path: &str, out: &mut Vec<String>) {
    match value {
        Value::Number(n) if n.as_i64().is_some_and(|i| i.unsigned_abs() > 1 << 53) => out.push(path.to_string()),
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                collect_big_integers(v, &format!("{path}[{i}]"), out);
            }
        }
        Value::Object(map) => {
            for (k, v) in map {
                collect_big_integers(v, &format!("{path}.{k}"), out);
            }
        }
        _ => {}
    }
}

/// Every problem of a manifest file's text: YAML that Kubernetes would read differently, kinds and
/// fields outside the CRDs, and WasmPlugin configurations keygate refuses. Empty when it is good.
fn check_manifest(text: &str) -> Vec<String> {
    let documents = match read_yaml(text) {
        Ok(d) => d,
        Err(problems) => return problems,
    };
    let mut problems = Vec::new();
    if documents.is_empty() {
        problems.push("no resource in the file".to_string());
    }
    for doc in &documents {
        let api_version = doc.str_at("apiVersion").unwrap_or_default();
        let kind = doc.str_at("kind").unwrap_or_default();
        let Some(crd) = CRDS.iter().find(|c| c.kind == kind && c.api_version == api_version) else {
            let known: Vec<String> = CRDS.iter().map(|c| format!("{} {}", c.kind, c.api_version)).collect();
            problems.push(format!(
                "line {}: {kind} {api_version}: not a kind the Istio manifests use ({})",
                doc.line(),
                known.join(", ")
            ));
            continue;
        };
        check_fields(crd, doc, "", "", &mut problems);
        if crd.kind == WASM_PLUGIN.kind {
            check_wasm_plugin(doc, &mut problems);
        }
    }
    problems
}

/// The shipped manifest files: (path relative to the repository root, text), in name order.
fn manifest_files() -> Vec<(String, String)> {
    let dir = repo_root().join(ISTIO_DIR);
    let mut names: Vec<String> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| {
            let path = format!("{ISTIO_DIR}/{n}");
            let text = fs::read_to_string(repo_root().join(&path)).unwrap_or_else(|e| panic!("{path}: {e}"));
            (path, text)
        })
        .collect()
}

fn manifest_text(name: &str) -> String {
    let path = repo_root().join(ISTIO_DIR).join(name);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The documents of one shipped manifest file, which must read cleanly.
fn documents(name: &str) -> Vec<Node> {
    read_yaml(&manifest_text(name)).unwrap_or_else(|p| panic!("{name}: {}", p.join("\n")))
}

fn resource<'a>(docs: &'a [Node], kind: &str) -> &'a Node {
    let found: Vec<&Node> = docs.iter().filter(|d| d.str_at("kind").as_deref() == Some(kind)).collect();
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

/// A WasmPlugin's `pluginConfig` as istiod hands it to Envoy: JSON text.
fn plugin_config(plugin: &Node) -> String {
    plugin.at("spec.pluginConfig").expect("spec.pluginConfig").json().to_string()
}

// =============================================================================================
// Tests: the manifests

#[test]
fn every_istio_manifest_passes_its_crd_and_keygates_configuration_check() {
    let files = manifest_files();
    let names: Vec<&str> = files.iter().map(|(p, _)| p.as_str()).collect();
    assert!(names.contains(&"envoy/istio/wasmplugin.yaml"), "{names:?}");
    assert!(names.contains(&"envoy/istio/wasmplugin-key-set.yaml"), "{names:?}");
    for (path, text) in &files {
        let problems = check_manifest(text);
        assert!(problems.is_empty(), "{path}:\n  {}", problems.join("\n  "));
    }
}

/// Plants a mistake into a copy of a shipped manifest (replacing `from` by `to`) and returns
/// what the check says.
fn planted(name: &str, from: &str, to: &str) -> Vec<String> {
    let text = manifest_text(name);
    assert_eq!(text.matches(from).count(), 1, "{name}: `{from}` must appear once");
    check_manifest(&text.replace(from, to))
}

fn assert_reported(problems: &[String], expected: &str) {
    assert!(
        problems.iter().any(|p| p.contains(expected)),
        "expected a problem containing {expected:?}, got:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn a_planted_unknown_field_is_reported_with_its_path() {
    let p = planted("wasmplugin.yaml", "  phase: AUTHN\n", "  phase: AUTHN\n  failurePolicy: FAIL_CLOSED\n");
    assert_reported(&p, "spec.failurePolicy: unknown field (not in the WasmPlugin CRD)");
    assert_eq!(p.len(), 1, "{p:?}");

    let p = planted("wasmplugin.yaml", "  - mode: SERVER\n", "  - mode: SERVER\n    port: 8080\n");
    assert_reported(&p, "spec.match[0].port: unknown field");

    let p = planted("wasmplugin-key-set.yaml", "  resolution: DNS\n", "  resolutoin: DNS\n");
    assert_reported(&p, "spec.resolutoin: unknown field (not in the ServiceEntry CRD)");

    let p = planted(
        "wasmplugin-key-set.yaml",
        "        sni: \"keys.example.com\"\n",
        "        snis: \"keys.example.com\"\n",
    );
    assert_reported(&p, "spec.trafficPolicy.portLevelSettings[0].tls.snis: unknown field");
}

#[test]
fn a_planted_wrong_value_is_reported() {
    // Envoy's spelling is FAIL_CLOSED; the WasmPlugin CRD's is FAIL_CLOSE.
    let p = planted("wasmplugin.yaml", "failStrategy: FAIL_CLOSE\n", "failStrategy: FAIL_CLOSED\n");
    assert_reported(&p, "spec.failStrategy: expected one of FAIL_CLOSE, FAIL_OPEN, FAIL_RELOAD, got \"FAIL_CLOSED\"");

    let p = planted("wasmplugin.yaml", "  selector:\n", "  targetRefs:\n  - {kind: Service, name: api}\n  selector:\n");
    assert_reported(&p, "spec: only one of targetRefs or selector can be set");

    let p = planted("wasmplugin-key-set.yaml", "  - number: 80\n", "  - number: \"80\"\n");
    assert_reported(&p, "spec.ports[0].number: expected an integer");

    let p = planted("wasmplugin.yaml", "kind: WasmPlugin\n", "kind: EnvoyFilter\n");
    assert_reported(&p, "EnvoyFilter extensions.istio.io/v1alpha1: not a kind the Istio manifests use");
}

#[test]
fn yaml_that_kubernetes_reads_differently_is_reported() {
    let p = planted("wasmplugin.yaml", "      revoked: true\n", "      revoked: yes\n");
    assert_reported(&p, "`yes` is a boolean to Kubernetes: quote it if it is a string");

    let p = planted("wasmplugin.yaml", "  phase: AUTHN\n", "  phase: AUTHN\n  phase: AUTHZ\n");
    assert_reported(&p, "`phase` repeated in the same map");
}

#[test]
fn a_planted_plugin_config_mistake_is_reported_with_keygates_field() {
    let p = planted("wasmplugin.yaml", "{path: \"/healthz\", public: true}", "{path: \"/healthz\", publik: true}");
    assert_reported(&p, "spec.pluginConfig: keygate refuses it: routes[0]");
    assert_reported(&p, "publik");

    let p = planted(
        "wasmplugin.yaml",
        "hash: \"605b02e9dbd0a8142f75b1ea54b8956285053d51ad4528113dad82318d932f1b\"",
        "hash: \"605b02e9dbd0a8142f75b1ea54b8956285053d51ad4528113dad82318d932f1\"",
    );
    assert_reported(&p, "spec.pluginConfig: keygate refuses it: keys[0].hash");

    let p = planted("wasmplugin-key-set.yaml", "      poll_interval_ms: 2000\n", "      poll_interval_ms: 20\n");
    assert_reported(&p, "spec.pluginConfig: keygate refuses it: key_set.poll_interval_ms");
}

#[test]
fn wasm_plugins_check_inbound_requests_first_and_fail_closed() {
    for name in ["wasmplugin.yaml", "wasmplugin-key-set.yaml"] {
        let docs = documents(name);
        let plugin = resource(&docs, "WasmPlugin");
        let at = |p: &str| plugin.at(p).map(Node::json).unwrap_or(Value::Null);
        assert_eq!(at("spec.phase"), "AUTHN", "{name}");
        assert_eq!(at("spec.failStrategy"), "FAIL_CLOSE", "{name}");
        assert_eq!(at("spec.type"), "HTTP", "{name}");
        assert_eq!(at("spec.pluginName"), "keygate", "{name}");
        // Only what the pod receives: the application's own outbound calls carry no API key.
        assert_eq!(at("spec.match"), json!([{"mode": "SERVER"}]), "{name}");
        assert!(at("spec.selector.matchLabels").as_object().is_some_and(|m| !m.is_empty()), "{name}");
        assert!(at("spec.url").as_str().is_some_and(|u| u.starts_with("oci://")), "{name}");
    }
}

#[test]
fn manifests_hold_key_hashes_never_keys() {
    for (path, text) in manifest_files() {
        for doc in read_yaml(&text).unwrap() {
            let Some(config) = doc.at("spec.pluginConfig").map(Node::json) else {
                continue;
            };
            let prefixes: Vec<String> = config["credential"]["prefixes"]
                .as_array()
                .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            let mut strings = Vec::new();
            collect_strings(&config, &mut strings);
            for s in strings {
                assert!(
                    !prefixes.iter().any(|p| s.starts_with(p.as_str()) && s.len() > p.len()),
                    "{path}: the plugin configuration holds something shaped like a key: {s}"
                );
            }
            for key in config["keys"].as_array().into_iter().flatten() {
                let h = key["hash"].as_str().unwrap_or_default();
                assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()), "{path}: {key}");
            }
        }
    }
}

fn collect_strings(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|v| collect_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| collect_strings(v, out)),
        _ => {}
    }
}

/// `outbound|<port>|<subset>|<host>`: the name istiod gives the Envoy cluster of a service port
/// (istio/istio pilot/pkg/model `BuildSubsetKey`).
fn istio_outbound_cluster(host: &str, port: i64) -> String {
    format!("outbound|{port}||{host}")
}

#[test]
fn key_set_plugin_fetches_through_the_cluster_of_its_service_entry_over_tls() {
    let docs = documents("wasmplugin-key-set.yaml");
    let plugin = resource(&docs, "WasmPlugin");
    let entry = resource(&docs, "ServiceEntry");
    let rule = resource(&docs, "DestinationRule");
    let key_set = plugin.at("spec.pluginConfig.key_set").expect("key_set").json();

    let hosts = entry.at("spec.hosts").unwrap().json();
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    let host = hosts[0].as_str().unwrap();
    let ports = entry.at("spec.ports").unwrap().json();
    let port = &ports[0];
    assert_eq!(port["protocol"], "HTTP", "keygate's fetch is plain HTTP inside the pod: {port}");
    let number = port["number"].as_i64().unwrap();
    assert_eq!(key_set["cluster"], istio_outbound_cluster(host, number));
    assert_eq!(key_set["authority"], host);
    assert_eq!(entry.str_at("spec.location").as_deref(), Some("MESH_EXTERNAL"));
    assert_eq!(entry.str_at("spec.resolution").as_deref(), Some("DNS"));
    assert_eq!(port["targetPort"], 443);

    // The sidecar originates TLS to the endpoint and checks its certificate.
    assert_eq!(rule.str_at("spec.host").as_deref(), Some(host));
    let settings = rule.at("spec.trafficPolicy.portLevelSettings").unwrap().json();
    let tls = settings
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["port"]["number"] == number)
        .map(|s| s["tls"].clone())
        .unwrap_or_else(|| panic!("no TLS settings for port {number}: {settings}"));
    assert_eq!(tls["mode"], "SIMPLE");
    assert_eq!(tls["sni"], host);
    assert!(tls.get("insecureSkipVerify").is_none());

    // All three in the plugin's namespace, and kept there.
    let namespace = plugin.str_at("metadata.namespace");
    for doc in [entry, rule] {
        assert_eq!(doc.str_at("metadata.namespace"), namespace);
        assert_eq!(doc.at("spec.exportTo").map(Node::json), Some(json!(["."])));
    }
}

// =============================================================================================
// Tests: the shipped plugin configurations in a real Envoy, configured as istiod configures it

/// Stat prefixes istio-agent always puts in Envoy's stats matcher (istio/istio
/// pkg/bootstrap/config.go, `requiredEnvoyStatsMatcherInclusionPrefixes`), plus the one README
/// "Using in Istio" adds with `proxyStatsMatcher.inclusionPrefixes`.
const ISTIO_STATS_PREFIXES: &[&str] =
    &["reporter=", "cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm", "wasmcustom.keygate"];

/// An Envoy bootstrap with keygate as istiod configures a WasmPlugin on a sidecar: the filter
/// named `<namespace>.<name>`, `root_id` = `pluginName`, no `vm_id`, `failStrategy: FAIL_CLOSE` as
/// `FAIL_CLOSED`, `pluginConfig` as JSON text; paths normalised as Istio does by default; Istio's
/// stats matcher. With `key_set_port`, the key-set cluster is named as istiod names the
/// ServiceEntry's cluster and points at the tests' key-set server.
fn istio_sidecar_bootstrap(plugin: &Node, upstream: u16, key_set: Option<(u16, &str)>) -> Value {
    let mut opts = EnvoyOptions::new(Some(&plugin_config(plugin)), upstream);
    opts.failure_policy = Some("FAIL_CLOSED".into());
    opts.normalize_path = true;
    opts.keyset_port = key_set.map(|(port, _)| port);
    let mut bootstrap = opts.bootstrap();
    let hcm = &mut bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"];
    let config = &mut hcm["http_filters"][0]["typed_config"]["config"];
    let namespace = plugin.str_at("metadata.namespace").unwrap();
    let name = plugin.str_at("metadata.name").unwrap();
    config["name"] = json!(format!("{namespace}.{name}"));
    config["root_id"] = json!(plugin.str_at("spec.pluginName").unwrap_or_default());
    config["vm_config"].as_object_mut().unwrap().remove("vm_id");
    if let Some((_, cluster_name)) = key_set {
        for cluster in bootstrap["static_resources"]["clusters"].as_array_mut().unwrap() {
            if cluster["name"] == KEYSET_CLUSTER {
                cluster["name"] = json!(cluster_name);
                cluster["load_assignment"]["cluster_name"] = json!(cluster_name);
            }
        }
    }
    let patterns: Vec<Value> = ISTIO_STATS_PREFIXES.iter().map(|p| json!({"prefix": p})).collect();
    bootstrap["stats_config"] = json!({"stats_matcher": {"inclusion_list": {"patterns": patterns}}});
    bootstrap
}

fn start_envoy(bootstrap: &Value) -> Envoy {
    Envoy::try_start_bootstrap(bootstrap, 2).unwrap_or_else(|log| panic!("Envoy did not start:\n{log}"))
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

/// A refusal's JSON body, after checking the shipped `errors.body` (code, message, request id).
fn refusal(reply: &common::Response, status: u16) -> Value {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(reply.header("content-type"), Some("application/json"));
    let body: Value = serde_json::from_str(&reply.body).unwrap_or_else(|e| panic!("{e}: {}", reply.body));
    assert!(body["request_id"].as_str().is_some_and(|r| !r.is_empty()), "{body}");
    body
}

/// The Prometheus text Istio scrapes from the sidecar (Envoy's `/stats/prometheus`).
fn prometheus(envoy: &Envoy) -> String {
    envoy.admin_get("/stats/prometheus").body
}

#[test]
fn wasm_plugin_config_refuses_a_bad_key_in_an_istio_configured_envoy() {
    let docs = documents("wasmplugin.yaml");
    let plugin = resource(&docs, "WasmPlugin");
    let upstream = Upstream::start();
    let envoy = start_envoy(&istio_sidecar_bootstrap(plugin, upstream.port(), None));

    for proto in Proto::ALL {
        let reply = get(envoy.port(), proto, "/v1/venues", &[("authorization", &bearer(UNKNOWN_KEY))]);
        let body = refusal(&reply, 401);
        assert_eq!(body["error"], "invalid_api_key");
        assert_eq!(body["message"], "The API key is invalid or has been revoked.");
        assert_eq!(reply.header("www-authenticate"), Some(r#"Bearer realm="api", error="invalid_token""#));

        let body = refusal(&get(envoy.port(), proto, "/v1/venues", &[("x-api-key", REVOKED_KEY)]), 401);
        assert_eq!(body["error"], "invalid_api_key");

        let body = refusal(&get(envoy.port(), proto, "/v1/venues", &[]), 401);
        assert_eq!(body["error"], "missing_api_key");

        let reply = get(envoy.port(), proto, "/v1/venues/v_7/treatments", &[("authorization", &bearer(PLATFORM_KEY))]);
        let body = refusal(&reply, 403);
        assert_eq!(body["error"], "insufficient_scope");
        assert_eq!(body["missing"], json!(["treatments:read"]));
    }
    assert!(upstream.requests().is_empty(), "a refused request reached the application: {:#?}", upstream.requests());

    let reply = get(envoy.port(), Proto::Http1, "/v1/venues/v_7/treatments", &[("authorization", &bearer(VENUE_KEY))]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let seen = upstream.single_request();
    assert_eq!(seen.header("x-org-id").as_deref(), Some("org_42"));
    assert_eq!(seen.header("x-api-key-id").as_deref(), Some("ab12cd34"));
    assert_eq!(seen.header("x-venue-id").as_deref(), Some("v_7"));
    assert!(!seen.has_header("authorization"), "the key reached the application");

    // Istio's stats matcher lets keygate's stats through; Prometheus sees them without the
    // `wasmcustom.` namespace.
    let metrics = prometheus(&envoy);
    for line in [
        "keygate_allowed{} 1",
        "keygate_denied_invalid_key{} 2",
        "keygate_denied_revoked_key{} 2",
        "keygate_denied_missing_key{} 2",
        "keygate_denied_insufficient_scope{} 2",
        "keygate_keys{} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "no `{line}` in /stats/prometheus:\n{metrics}");
    }
}

#[test]
fn key_set_plugin_config_loads_its_keys_through_the_service_entry_cluster() {
    let docs = documents("wasmplugin-key-set.yaml");
    let plugin = resource(&docs, "WasmPlugin");
    let key_set = plugin.at("spec.pluginConfig.key_set").unwrap().json();
    let cluster = key_set["cluster"].as_str().unwrap();
    let path = key_set["path"].as_str().unwrap();
    assert_eq!(path, common::MANIFEST_PATH, "the tests' key-set server publishes there");

    let server = KeySetServer::start();
    server.publish(
        &[
            json!({"id": "ab12cd34", "hash": hash(VENUE_KEY), "org": "org_42",
                   "scopes": ["venues:read", "treatments:read"], "attributes": {"venue": "v_7"}}),
            json!({"id": "c0ffee00", "hash": hash(REVOKED_KEY), "org": "org_99", "scopes": ["venues:read"],
                   "revoked": true}),
        ],
        1,
        1,
    );
    let upstream = Upstream::start();
    let envoy = start_envoy(&istio_sidecar_bootstrap(plugin, upstream.port(), Some((server.port(), cluster))));

    // The break-glass key in `keys` works from the start; keys from the endpoint once it has loaded.
    let reply = get(envoy.port(), Proto::Http1, "/v1/venues", &[("authorization", &bearer(PLATFORM_KEY))]);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let poll = Duration::from_millis(key_set["poll_interval_ms"].as_u64().unwrap());
    let deadline = Instant::now() + poll + Duration::from_secs(3);
    loop {
        let reply = get(envoy.port(), Proto::Http1, "/v1/venues/v_7", &[("authorization", &bearer(VENUE_KEY))]);
        if reply.status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the key set never loaded: {} {}", reply.status, reply.body);
        std::thread::sleep(Duration::from_millis(100));
    }
    let requests = server.requests_for(path);
    assert!(!requests.is_empty());
    assert_eq!(requests[0].header("host"), key_set["authority"].as_str(), "{:?}", requests[0].headers);

    upstream.clear();
    for key in [UNKNOWN_KEY, REVOKED_KEY] {
        let body = refusal(&get(envoy.port(), Proto::Http2, "/v1/venues", &[("authorization", &bearer(key))]), 401);
        assert_eq!(body["error"], "invalid_api_key");
    }
    assert!(upstream.requests().is_empty());
    let metrics = prometheus(&envoy);
    assert!(metrics.lines().any(|l| l == "keygate_key_set_keys{} 2"), "{metrics}");
}

// =============================================================================================
// The OCI image

/// A directory under the cargo target's tmpdir, removed on Drop unless the test is failing.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("istio/{}-{n}-{label}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        TempDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
}

/// Runs a script of tools/oci with python3 from the repository root; returns its standard output.
fn python(script: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .current_dir(repo_root())
        .arg(format!("tools/oci/{script}"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running python3 tools/oci/{script}: {e} (python3 is needed)"));
    assert!(
        out.status.success(),
        "python3 tools/oci/{script} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A copy of the built filter in `dir`, so that a rebuild during the test changes nothing.
fn stable_copy_of_wasm(dir: &TempDir) -> PathBuf {
    let copy = dir.path().join("keygate.wasm");
    fs::copy(wasm_path(), &copy).unwrap();
    copy
}

/// `make image` into `out`: returns the digest printed.
fn build_image(wasm: &Path, out: &Path, tag: &str) -> String {
    python("build_image.py", &["--wasm", wasm.to_str().unwrap(), "--out", out.to_str().unwrap(), "--tag", tag])
}

fn blob_path(layout: &Path, digest: &str) -> PathBuf {
    layout.join("blobs/sha256").join(digest.strip_prefix("sha256:").unwrap_or_else(|| panic!("digest {digest}")))
}

/// Checks an OCI image layout as the image-spec defines it (oci-layout, index.json, every blob
/// named by its own SHA-256) and returns its one manifest: (bytes, descriptor in index.json).
fn read_layout(layout: &Path) -> (Vec<u8>, Value) {
    let oci_layout: Value = serde_json::from_slice(&fs::read(layout.join("oci-layout")).unwrap()).unwrap();
    assert_eq!(oci_layout, json!({"imageLayoutVersion": "1.0.0"}));
    for entry in fs::read_dir(layout.join("blobs/sha256")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        assert_eq!(sha256_hex(&fs::read(entry.path()).unwrap()), name, "blob not named by its digest");
    }
    let index: Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["schemaVersion"], 2);
    assert_eq!(index["mediaType"], "application/vnd.oci.image.index.v1+json");
    let manifests = index["manifests"].as_array().unwrap();
    assert_eq!(manifests.len(), 1, "{index}");
    let descriptor = manifests[0].clone();
    let bytes = fs::read(blob_path(layout, descriptor["digest"].as_str().unwrap())).unwrap();
    assert_eq!(descriptor["size"], bytes.len());
    assert_eq!(descriptor["mediaType"], OCI_MANIFEST);
    (bytes, descriptor)
}

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const WASM_LAYER: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
const WASM_CONFIG: &str = "application/vnd.module.wasm.config.v1+json";

/// What Istio's agent does with a pulled image manifest (istio/istio pkg/wasm/imagefetcher.go):
/// a Docker schema 2 manifest, or one whose last layer is `application/vnd.oci.image.layer.v1.tar+gzip`,
/// is the *compat* variant (a tar.gz holding `plugin.wasm`); anything else must be the *oci*
/// variant: exactly two layers, the module being the one of type
/// `application/vnd.module.wasm.content.layer.v1+wasm`, raw. Returns that layer's descriptor.
fn istio_wasm_layer(manifest: &Value) -> Result<Value, String> {
    if manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json" {
        return Err("a Docker image: Istio looks for plugin.wasm in a tar.gz layer".into());
    }
    let layers = manifest["layers"].as_array().ok_or("no layers")?;
    if layers.last().is_some_and(|l| l["mediaType"] == "application/vnd.oci.image.layer.v1.tar+gzip") {
        return Err("the compat variant: Istio looks for plugin.wasm in a tar.gz layer".into());
    }
    if layers.len() != 2 {
        return Err(format!("number of layers must be 2 but got {}", layers.len()));
    }
    layers.iter().find(|l| l["mediaType"] == WASM_LAYER).cloned().ok_or(format!("no layer of type {WASM_LAYER}"))
}

#[test]
fn image_digest_depends_on_the_wasm_alone() {
    let dir = TempDir::new("digest");
    let wasm = stable_copy_of_wasm(&dir);
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    let digest_a = build_image(&wasm, &a, "0.1.0");
    let digest_b = build_image(&wasm, &b, "another-tag");
    assert_eq!(digest_a, digest_b, "the same .wasm gave two digests");
    assert!(digest_a.len() == 71 && digest_a.starts_with("sha256:"), "{digest_a}");

    let (manifest, descriptor) = read_layout(&a);
    assert_eq!(descriptor["digest"], digest_a.as_str());
    assert_eq!(format!("sha256:{}", sha256_hex(&manifest)), digest_a);
    assert_eq!(descriptor["annotations"]["org.opencontainers.image.ref.name"], "0.1.0");
    assert_eq!(read_layout(&b).0, manifest, "the tag changed the manifest");
    for digest in fs::read_dir(a.join("blobs/sha256")).unwrap() {
        let name = digest.unwrap().file_name();
        assert_eq!(
            fs::read(a.join("blobs/sha256").join(&name)).unwrap(),
            fs::read(b.join("blobs/sha256").join(&name)).unwrap()
        );
    }

    // The manifest: Istio's *oci* variant, the .wasm as its layer byte for byte.
    let parsed: Value = serde_json::from_slice(&manifest).unwrap();
    assert_eq!(parsed["schemaVersion"], 2);
    assert_eq!(parsed["mediaType"], OCI_MANIFEST);
    assert_eq!(parsed["config"]["mediaType"], WASM_CONFIG);
    let layer = istio_wasm_layer(&parsed).unwrap_or_else(|e| panic!("Istio would refuse the image: {e}"));
    let wasm_bytes = fs::read(&wasm).unwrap();
    assert_eq!(layer["digest"], format!("sha256:{}", sha256_hex(&wasm_bytes)));
    assert_eq!(fs::read(blob_path(&a, layer["digest"].as_str().unwrap())).unwrap(), wasm_bytes);
    let config: Value =
        serde_json::from_slice(&fs::read(blob_path(&a, parsed["config"]["digest"].as_str().unwrap())).unwrap())
            .unwrap();
    assert_eq!(
        config,
        json!({"type": "envoy_proxy", "abiVersions": ["proxy_abi_version_0_2_1"], "config": {"rootIds": ["keygate"]}})
    );

    // Another .wasm (the same module with a custom section appended) is another image.
    let mut other = wasm_bytes.clone();
    other.extend_from_slice(b"\x00\x05\x04note");
    let other_wasm = dir.path().join("other.wasm");
    fs::write(&other_wasm, &other).unwrap();
    assert_ne!(build_image(&other_wasm, &dir.path().join("c"), "0.1.0"), digest_a);
}

/// Debian's docker-registry: `$DOCKER_REGISTRY`, else the copy `make image-deps` unpacks into
/// target/tools, else `docker-registry` on the PATH.
fn registry_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("DOCKER_REGISTRY") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "DOCKER_REGISTRY={}: no such file", path.display());
        return path;
    }
    let unpacked = repo_root().join("target/tools/docker-registry/usr/bin/docker-registry");
    if unpacked.is_file() {
        return unpacked;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("docker-registry")).find(|p| p.is_file()));
    on_path.unwrap_or_else(|| {
        panic!(
            "no OCI registry to test the image against: run `make image-deps` (unpacks Debian's \
             docker-registry package into target/tools), or set DOCKER_REGISTRY to a registry binary"
        )
    })
}

/// A docker-registry on 127.0.0.1 with its storage in a temporary directory; killed on Drop.
struct Registry {
    child: Child,
    port: u16,
    dir: TempDir,
}

impl Registry {
    fn start() -> Registry {
        let binary = registry_binary();
        let dir = TempDir::new("registry");
        let config_path = dir.path().join("config.yml");
        let log_path = dir.path().join("registry.log");
        // The port is picked by binding port 0 and letting it go: another process may take it in
        // between, so a registry that exits at start is tried again on another port.
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n  secret: keygate-test\n",
                dir.path().join("data").display()
            );
            fs::write(&config_path, config).unwrap();
            let log = fs::File::create(&log_path).unwrap();
            let mut cmd = Command::new(&binary);
            cmd.arg("serve").arg(&config_path).stdin(Stdio::null()).stdout(log.try_clone().unwrap()).stderr(log);
            // The registry reads REGISTRY_* variables as configuration: none from outside.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("REGISTRY_") {
                    cmd.env_remove(name);
                }
            }
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. The
            // registry dies with the test thread that started it, should that die first.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let deadline = Instant::now() + Duration::from_secs(15);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if http_get(port, "/v2/", &[]).is_ok_and(|r| r.status == 200) {
                    return Registry { child, port, dir };
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("docker-registry not ready in 15 s:\n{}", fs::read_to_string(&log_path).unwrap_or_default());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("docker-registry exited at start, five times:\n{}", fs::read_to_string(&log_path).unwrap_or_default())
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    fn get(&self, path: &str, headers: &[(&str, &str)]) -> BinaryResponse {
        http_get(self.port, path, headers).unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.log()))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct BinaryResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl BinaryResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 GET on 127.0.0.1, the body kept as bytes.
fn http_get(port: u16, path: &str, headers: &[(&str, &str)]) -> Result<BinaryResponse, String> {
    let stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\nconnection: close\r\n");
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str("\r\n");
    (&stream).write_all(request.as_bytes()).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(&stream);
    let head = http1::read_head(&mut reader).map_err(|e| e.to_string())?.ok_or("no reply")?;
    let status = head.start_line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or("bad status line")?;
    let body = http1::read_response_body(&mut reader, &head, status, false).map_err(|e| e.to_string())?;
    Ok(BinaryResponse { status, headers: head.headers, body })
}

/// The media types go-containerregistry (Istio's puller) accepts for a manifest.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

#[test]
fn image_round_trips_through_a_real_registry_by_tag_and_by_digest() {
    let dir = TempDir::new("push");
    let wasm_file = stable_copy_of_wasm(&dir);
    let wasm = fs::read(&wasm_file).unwrap();
    let layout = dir.path().join("keygate");
    let digest = build_image(&wasm_file, &layout, "0.1.0");
    let (manifest_bytes, _) = read_layout(&layout);

    let registry = Registry::start();
    let pushed =
        python("push.py", &[layout.to_str().unwrap(), &format!("127.0.0.1:{}/mesh/keygate:0.1.0", registry.port)]);
    assert_eq!(pushed, format!("127.0.0.1:{}/mesh/keygate:0.1.0@{digest}", registry.port));

    // By tag, then by digest, as Istio pulls `oci://127.0.0.1:PORT/mesh/keygate:0.1.0` (or `@sha256:…`).
    let by_tag = registry.get("/v2/mesh/keygate/manifests/0.1.0", &[("accept", ACCEPT_MANIFESTS)]);
    let by_digest = registry.get(&format!("/v2/mesh/keygate/manifests/{digest}"), &[("accept", ACCEPT_MANIFESTS)]);
    for (how, reply) in [("tag", &by_tag), ("digest", &by_digest)] {
        assert_eq!(reply.status, 200, "by {how}: {}", String::from_utf8_lossy(&reply.body));
        assert_eq!(reply.header("content-type"), Some(OCI_MANIFEST), "by {how}");
        assert_eq!(reply.header("docker-content-digest"), Some(digest.as_str()), "by {how}");
        assert_eq!(reply.body, manifest_bytes, "by {how}: the registry changed the manifest");
    }

    let manifest: Value = serde_json::from_slice(&by_tag.body).unwrap();
    let layer = istio_wasm_layer(&manifest).unwrap_or_else(|e| panic!("Istio would refuse the pulled image: {e}"));
    let blobs: BTreeMap<String, Vec<u8>> = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .chain([&manifest["config"]])
        .map(|d| {
            let d = d["digest"].as_str().unwrap().to_string();
            let reply = registry.get(&format!("/v2/mesh/keygate/blobs/{d}"), &[]);
            assert_eq!(reply.status, 200, "blob {d}");
            assert_eq!(format!("sha256:{}", sha256_hex(&reply.body)), d);
            (d, reply.body)
        })
        .collect();
    let pulled = &blobs[layer["digest"].as_str().unwrap()];
    assert!(pulled == &wasm, "the pulled layer is not byte-identical to the .wasm");
    assert!(pulled.starts_with(b"\0asm"), "Istio checks the wasm magic number");

    // Pushing again uploads nothing and keeps the digest.
    let again = python("push.py", &[layout.to_str().unwrap(), &format!("127.0.0.1:{}/mesh/keygate", registry.port)]);
    assert_eq!(again, pushed);
    let tags = registry.get("/v2/mesh/keygate/tags/list", &[]);
    assert_eq!(
        serde_json::from_slice::<Value>(&tags.body).unwrap(),
        json!({"name": "mesh/keygate", "tags": ["0.1.0"]})
    );
}
