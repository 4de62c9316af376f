//! Finds keygate's plugin configuration in an Envoy configuration file (YAML, or JSON, which is
//! YAML too): every wasm filter whose `name`, `root_id`, `vm_config.vm_id` or code file names
//! keygate, with its `configuration.value` string and the line it stands on; and every Istio
//! `WasmPlugin` whose name, `url` or `pluginName` names keygate, with its `pluginConfig`.

use crate::json;
use serde_json::{Map, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// One keygate configuration found in an Envoy file.
#[derive(Debug)]
pub struct Found {
    /// The JSON text of the plugin configuration.
    pub json: String,
    /// The 1-based line of the configuration value (for a literal block, of its first line).
    pub line: usize,
    lines: Lines,
}

/// How a field of the configuration maps to a line of the file.
#[derive(Debug)]
enum Lines {
    /// A literal block (`value: |`): its lines are the file's lines.
    Block,
    /// A quoted or folded string: everything is on the value's line.
    Value,
    /// A YAML mapping (Istio's `pluginConfig`): the line of each field path.
    Fields(Vec<(String, usize)>),
}

impl Found {
    /// The line of the file that holds `field` (or the closest part of it that exists).
    pub fn line_of(&self, field: &str) -> usize {
        let within = |path: &str| {
            path.is_empty()
                || field.strip_prefix(path).is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        };
        match &self.lines {
            Lines::Block if !field.is_empty() => {
                let text = self.json.as_bytes();
                json::locate(text, field).map_or(self.line, |at| self.line + json::line_of(text, at) - 1)
            }
            Lines::Fields(fields) => fields
                .iter()
                .filter(|(path, _)| within(path))
                .max_by_key(|(path, _)| path.len())
                .map_or(self.line, |(_, line)| *line),
            _ => self.line,
        }
    }
}

/// What a file holds: the keygate configurations, the lines of keygate filters whose configuration
/// comes from extension config discovery (ECDS: another file or server), and how many wasm filters
/// were not keygate's.
#[derive(Debug, Default)]
pub struct Scan {
    pub found: Vec<Found>,
    pub discovered: Vec<usize>,
    pub other_wasm_filters: usize,
}

/// Deeper YAML than this is refused rather than risking the stack.
const MAX_DEPTH: usize = 256;

#[derive(Debug)]
enum Node {
    Scalar {
        value: String,
        style: TScalarStyle,
        line: usize,
    },
    Seq(Vec<Node>),
    Map(Vec<(Node, Node)>),
    /// An alias is not expanded: what it points at is scanned where it is defined.
    Alias,
}

impl Node {
    fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(entries) => {
                entries.iter().find(|(k, _)| matches!(k, Node::Scalar { value, .. } if value == key)).map(|(_, v)| v)
            }
            _ => None,
        }
    }

    fn path(&self, keys: &[&str]) -> Option<&Node> {
        keys.iter().try_fold(self, |node, key| node.get(key))
    }

    fn text(&self) -> Option<&str> {
        match self {
            Node::Scalar { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// Builds [`Node`] trees from parser events.
#[derive(Default)]
struct Builder {
    /// Open containers: a sequence's items, or a mapping's flattened keys and values.
    stack: Vec<(bool, Vec<Node>)>,
    documents: Vec<Node>,
    too_deep: Option<usize>,
}

impl Builder {
    fn push(&mut self, node: Node) {
        match self.stack.last_mut() {
            Some((_, items)) => items.push(node),
            None => self.documents.push(node),
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, event: Event, mark: Marker) {
        if self.too_deep.is_some() {
            return;
        }
        match event {
            Event::Scalar(value, style, _, _) => self.push(Node::Scalar { value, style, line: mark.line() }),
            Event::Alias(_) => self.push(Node::Alias),
            Event::SequenceStart(..) | Event::MappingStart(..) => {
                if self.stack.len() >= MAX_DEPTH {
                    self.too_deep = Some(mark.line());
                    return;
                }
                self.stack.push((matches!(event, Event::MappingStart(..)), Vec::new()));
            }
            Event::SequenceEnd | Event::MappingEnd => {
                if let Some((is_map, items)) = self.stack.pop() {
                    let node = if is_map {
                        let mut entries = Vec::with_capacity(items.len() / 2);
                        let mut items = items.into_iter();
                        while let (Some(k), Some(v)) = (items.next(), items.next()) {
                            entries.push((k, v));
                        }
                        Node::Map(entries)
                    } else {
                        Node::Seq(items)
                    };
                    self.push(node);
                }
            }
            _ => {}
        }
    }
}

/// Parses `text` and finds every keygate configuration in it. `Err` is a one-line YAML problem
/// with its line.
pub fn scan(text: &str) -> Result<Scan, (usize, String)> {
    let mut builder = Builder::default();
    Parser::new_from_str(text)
        .load(&mut builder, true)
        .map_err(|e| (e.marker().line(), format!("not valid YAML: {}", e.info())))?;
    if let Some(line) = builder.too_deep {
        return Err((line, format!("YAML nested deeper than {MAX_DEPTH} levels")));
    }
    let mut scan = Scan::default();
    let mut pending: Vec<&Node> = builder.documents.iter().collect();
    while let Some(node) = pending.pop() {
        match node {
            Node::Map(entries) => {
                if node.get("config_discovery").is_some() && names_keygate(node) {
                    scan.discovered.push(first_line(node));
                }
                if node.get("kind").and_then(Node::text) == Some("WasmPlugin") {
                    if istio_names_keygate(node) {
                        scan.found.push(istio_configuration(node));
                    } else {
                        scan.other_wasm_filters += 1;
                    }
                } else if is_wasm_plugin_config(node) {
                    if names_keygate(node) {
                        scan.found.push(configuration_of(node));
                    } else {
                        scan.other_wasm_filters += 1;
                    }
                }
                pending.extend(entries.iter().rev().map(|(_, v)| v));
            }
            Node::Seq(items) => pending.extend(items.iter().rev()),
            Node::Scalar { .. } | Node::Alias => {}
        }
    }
    Ok(scan)
}

/// An Envoy wasm `PluginConfig`: it has a `vm_config`, or a `configuration` with an `@type`.
fn is_wasm_plugin_config(node: &Node) -> bool {
    node.get("vm_config").is_some() || node.path(&["configuration", "@type"]).is_some()
}

fn names_keygate(node: &Node) -> bool {
    let candidates = [
        node.get("name"),
        node.get("root_id"),
        node.path(&["vm_config", "vm_id"]),
        node.path(&["vm_config", "code", "local", "filename"]),
        node.path(&["vm_config", "code", "remote", "http_uri", "uri"]),
    ];
    candidates.iter().flatten().filter_map(|n| n.text()).any(|t| t.to_ascii_lowercase().contains("keygate"))
}

fn configuration_of(node: &Node) -> Found {
    match node.path(&["configuration", "value"]) {
        Some(Node::Scalar { value, style, line }) => Found {
            json: value.clone(),
            line: *line,
            lines: if *style == TScalarStyle::Literal { Lines::Block } else { Lines::Value },
        },
        // No value: the filter gets an empty configuration, which it refuses; so does check.
        _ => Found { json: String::new(), line: first_line(node), lines: Lines::Value },
    }
}

/// `text` (the Envoy file `found` was scanned from) with that configuration's literal block
/// replaced by `json`, at the same indentation; every other byte is kept.
pub fn replace_block(text: &str, found: &Found, json: &str) -> Result<String, String> {
    if !matches!(found.lines, Lines::Block) {
        return Err("its configuration.value is not a literal block (`value: |`), so it cannot be replaced".into());
    }
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let old: Vec<&str> = found.json.lines().collect();
    let first = found.line.checked_sub(1).ok_or("no configuration block")?;
    let block = lines.get(first..first + old.len()).ok_or("the configuration block is cut short")?;
    let (head, old_first) = (block.first().copied().unwrap_or_default(), old.first().copied().unwrap_or_default());
    let indent_len =
        head.trim_end_matches(['\n', '\r']).len().checked_sub(old_first.len()).ok_or("unexpected block")?;
    let indent = head.get(..indent_len).ok_or("unexpected block")?;
    let same = block.iter().zip(&old).all(|(file_line, value_line)| {
        let file_line = file_line.trim_end_matches(['\n', '\r']);
        (value_line.is_empty() && file_line.trim().is_empty()) || file_line.strip_prefix(indent) == Some(value_line)
    });
    if !indent.bytes().all(|c| c == b' ') || !same {
        return Err("cannot find the lines of its configuration block".into());
    }
    let newline = if head.ends_with("\r\n") { "\r\n" } else { "\n" };
    let mut out = String::with_capacity(text.len() + json.len());
    lines.iter().take(first).for_each(|l| out.push_str(l));
    for line in json.lines() {
        if !line.is_empty() {
            out.push_str(indent);
            out.push_str(line);
        }
        out.push_str(newline);
    }
    lines.iter().skip(first + old.len()).for_each(|l| out.push_str(l));
    Ok(out)
}

fn istio_names_keygate(node: &Node) -> bool {
    let candidates =
        [node.path(&["metadata", "name"]), node.path(&["spec", "url"]), node.path(&["spec", "pluginName"])];
    candidates.iter().flatten().filter_map(|n| n.text()).any(|t| t.to_ascii_lowercase().contains("keygate"))
}

/// An Istio `WasmPlugin`'s `spec.pluginConfig`, a YAML mapping, as the JSON text the filter gets.
fn istio_configuration(node: &Node) -> Found {
    let Some(config) = node.path(&["spec", "pluginConfig"]) else {
        return Found { json: String::new(), line: first_line(node), lines: Lines::Value };
    };
    let mut fields = Vec::new();
    let value = to_json(config, "", &mut fields);
    let json = serde_json::to_string(&value).unwrap_or_default();
    Found { json, line: first_line(config), lines: Lines::Fields(fields) }
}

/// YAML to JSON by YAML 1.2's core schema, noting the line of every field path on the way.
fn to_json(node: &Node, path: &str, lines: &mut Vec<(String, usize)>) -> Value {
    match node {
        Node::Scalar { value, style: TScalarStyle::Plain, .. } => plain_scalar(value),
        Node::Scalar { value, .. } => Value::String(value.clone()),
        Node::Seq(items) => Value::Array(
            items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    let here = format!("{path}[{i}]");
                    lines.push((here.clone(), first_line(item)));
                    to_json(item, &here, lines)
                })
                .collect(),
        ),
        Node::Map(entries) => {
            let mut map = Map::new();
            for (key, item) in entries {
                let name = key.text().unwrap_or_default().to_string();
                let here = if path.is_empty() { name.clone() } else { format!("{path}.{name}") };
                lines.push((here.clone(), first_line(key)));
                let item = to_json(item, &here, lines);
                map.insert(name, item);
            }
            Value::Object(map)
        }
        Node::Alias => Value::Null,
    }
}

/// A plain (unquoted) scalar: null, a boolean, a number, or else a string.
fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|c| c.is_ascii_digit()) {
        if let Ok(n) = text.parse::<i64>() {
            return Value::from(n);
        }
    }
    let numeric = digits.bytes().any(|c| c.is_ascii_digit())
        && digits.bytes().all(|c| c.is_ascii_digit() || b".eE+-".contains(&c))
        && digits.starts_with(|c: char| c.is_ascii_digit() || c == '.');
    match text.parse::<f64>() {
        Ok(f) if numeric => serde_json::Number::from_f64(f).map_or(Value::String(text.into()), Value::Number),
        _ => Value::String(text.to_string()),
    }
}

fn first_line(node: &Node) -> usize {
    match node {
        Node::Scalar { line, .. } => *line,
        Node::Map(entries) => entries.first().map_or(0, |(k, _)| first_line(k)),
        Node::Seq(items) => items.first().map_or(0, first_line),
        Node::Alias => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
http_filters:
- name: envoy.filters.http.wasm
  typed_config:
    config:
      name: other
      vm_config: { vm_id: other, code: { local: { filename: other.wasm } } }
      configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: "{}" }
- name: envoy.filters.http.wasm
  typed_config:
    config:
      root_id: keygate
      vm_config:
        code: { local: { filename: target/wasm32-wasip1/release/keygate.wasm } }
      configuration:
        "@type": type.googleapis.com/google.protobuf.StringValue
        value: |
          {
            "keys": []
          }
"#;

    #[test]
    fn finds_keygate_filters_and_their_lines() {
        let scan = scan(FILE).unwrap();
        assert_eq!(scan.other_wasm_filters, 1);
        assert_eq!(scan.found.len(), 1);
        let found = &scan.found[0];
        assert_eq!(found.json, "{\n  \"keys\": []\n}\n");
        assert_eq!(found.line, 18);
        assert_eq!(found.line_of("keys"), 19);
        assert_eq!(found.line_of(""), 18);
    }

    #[test]
    fn replaces_a_literal_block_and_keeps_every_other_byte() {
        let found = scan(FILE).unwrap();
        let out = replace_block(FILE, &found.found[0], "{\n  \"keys\": [],\n\n  \"routes\": []\n}\n").unwrap();
        let want = FILE.replace(
            "          {\n            \"keys\": []\n          }\n",
            "          {\n            \"keys\": [],\n\n            \"routes\": []\n          }\n",
        );
        assert_eq!(out, want);
        let again = scan(&out).unwrap();
        assert_eq!(again.found[0].json, "{\n  \"keys\": [],\n\n  \"routes\": []\n}\n");
        let quoted = scan(r#"{"name": "keygate", "vm_config": {}, "configuration": {"value": "{}"}}"#).unwrap();
        assert!(replace_block("", &quoted.found[0], "{}").is_err());
    }

    #[test]
    fn notes_filters_configured_by_discovery() {
        let scan = scan("filters:\n- name: keygate\n  config_discovery: {config_source: {}}\n").unwrap();
        assert!(scan.found.is_empty());
        assert_eq!(scan.discovered, [2]);
    }

    #[test]
    fn reads_json_envoy_files_and_quoted_values() {
        let text = r#"{"config": {"name": "keygate", "vm_config": {}, "configuration": {"value": "{\"keys\": []}"}}}"#;
        let scan = scan(text).unwrap();
        assert_eq!(scan.found[0].json, r#"{"keys": []}"#);
        assert_eq!(scan.found[0].line_of("keys"), 1);
    }

    #[test]
    fn reads_an_istio_wasm_plugin_config_with_the_line_of_each_field() {
        let text = "\
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: keygate}
spec:
  url: oci://example/keygate:1
  pluginConfig:
    max: 12
    ok: true
    none: ~
    text: '12'
    keys:
    - id: a
      hash: x
";
        let scan = scan(text).unwrap();
        let found = &scan.found[0];
        let value: Value = serde_json::from_str(&found.json).unwrap();
        assert_eq!(
            value,
            serde_json::json!({"max": 12, "ok": true, "none": null, "text": "12", "keys": [{"id": "a", "hash": "x"}]})
        );
        assert_eq!(found.line, 7);
        assert_eq!(found.line_of("keys[0].hash"), 13);
        assert_eq!(found.line_of("keys[0].org"), 12);
        assert_eq!(found.line_of("credential"), 7);
    }

    #[test]
    fn plain_scalars_follow_the_core_schema() {
        assert_eq!(plain_scalar("-3"), Value::from(-3));
        assert_eq!(plain_scalar("1.5e3"), Value::from(1500.0));
        assert_eq!(plain_scalar("v_7"), Value::from("v_7"));
        assert_eq!(plain_scalar("1.2.3"), Value::from("1.2.3"));
        assert_eq!(plain_scalar("inf"), Value::from("inf"));
    }

    #[test]
    fn reports_yaml_errors_with_their_line() {
        let (line, message) = scan("a: 1\nb: [\n").unwrap_err();
        assert!(line >= 2, "{line}");
        assert!(message.starts_with("not valid YAML"), "{message}");
    }
}
