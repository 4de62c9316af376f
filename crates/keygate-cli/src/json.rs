//! Byte spans in JSON text, so that files can be edited in place (every byte outside the edit kept),
//! and a re-indenter that keeps member order and every scalar exactly as written.
//!
//! The scanner is only ever given text that serde_json has already accepted; it still returns an
//! error rather than panicking if that ever fails to hold. Nesting is bounded by serde_json's own
//! recursion limit (128), so recursion here is bounded too.

use std::collections::hash_map::{Entry, HashMap};
use std::fmt::Write as _;

/// One member of a JSON object: its decoded name and the byte spans of its name and value.
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    pub name_start: usize,
    pub value: Span,
}

/// A half-open byte range `start..end` of one JSON value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

fn unexpected(at: usize) -> String {
    format!("unexpected JSON at byte {at}")
}

pub fn skip_ws(text: &[u8], mut at: usize) -> usize {
    while text.get(at).is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r')) {
        at += 1;
    }
    at
}

/// The span of the value starting at `at` (after any whitespace).
pub fn value_at(text: &[u8], at: usize) -> Result<Span, String> {
    let start = skip_ws(text, at);
    let end = match text.get(start) {
        Some(b'"') => string_end(text, start)?,
        Some(b'{') => members(text, start)?.1,
        Some(b'[') => elements(text, start)?.1,
        Some(_) => {
            let mut end = start;
            while text.get(end).is_some_and(|c| c.is_ascii_alphanumeric() || b"+-.".contains(c)) {
                end += 1;
            }
            if end == start {
                return Err(unexpected(start));
            }
            end
        }
        None => return Err(unexpected(start)),
    };
    Ok(Span { start, end })
}

fn string_end(text: &[u8], start: usize) -> Result<usize, String> {
    let mut at = start + 1;
    loop {
        match text.get(at) {
            Some(b'"') => return Ok(at + 1),
            Some(b'\\') => at += 2,
            Some(_) => at += 1,
            None => return Err(unexpected(start)),
        }
    }
}

/// The members of the object starting at `start` (`{`), and the end of the object.
pub fn members(text: &[u8], start: usize) -> Result<(Vec<Member>, usize), String> {
    if text.get(start) != Some(&b'{') {
        return Err(unexpected(start));
    }
    let mut out = Vec::new();
    let mut at = skip_ws(text, start + 1);
    if text.get(at) == Some(&b'}') {
        return Ok((out, at + 1));
    }
    loop {
        let name_start = skip_ws(text, at);
        if text.get(name_start) != Some(&b'"') {
            return Err(unexpected(name_start));
        }
        let name_end = string_end(text, name_start)?;
        let raw_name = text.get(name_start..name_end).ok_or_else(|| unexpected(name_start))?;
        let name: String = serde_json::from_slice(raw_name).map_err(|_| unexpected(name_start))?;
        let colon = skip_ws(text, name_end);
        if text.get(colon) != Some(&b':') {
            return Err(unexpected(colon));
        }
        let value = value_at(text, colon + 1)?;
        out.push(Member { name, name_start, value });
        at = skip_ws(text, value.end);
        match text.get(at) {
            Some(b',') => at += 1,
            Some(b'}') => return Ok((out, at + 1)),
            _ => return Err(unexpected(at)),
        }
    }
}

/// The element spans of the array starting at `start` (`[`), and the end of the array.
pub fn elements(text: &[u8], start: usize) -> Result<(Vec<Span>, usize), String> {
    if text.get(start) != Some(&b'[') {
        return Err(unexpected(start));
    }
    let mut out = Vec::new();
    let mut at = skip_ws(text, start + 1);
    if text.get(at) == Some(&b']') {
        return Ok((out, at + 1));
    }
    loop {
        let value = value_at(text, at)?;
        out.push(value);
        at = skip_ws(text, value.end);
        match text.get(at) {
            Some(b',') => at += 1,
            Some(b']') => return Ok((out, at + 1)),
            _ => return Err(unexpected(at)),
        }
    }
}

/// The whitespace that starts the line holding byte `at`, if only whitespace stands before `at`
/// on that line (so an insertion there can start a new line with the same indentation).
pub fn indent_before(text: &[u8], at: usize) -> Option<&str> {
    let head = text.get(..at)?;
    let line_start = head.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
    let indent = head.get(line_start..)?;
    if indent.iter().all(|&c| c == b' ' || c == b'\t') {
        std::str::from_utf8(indent).ok()
    } else {
        None
    }
}

/// The line ending the file already uses.
pub fn newline_of(text: &[u8]) -> &'static str {
    if text.windows(2).any(|w| w == b"\r\n") {
        "\r\n"
    } else {
        "\n"
    }
}

/// The byte offset of the value a field path names (`keys[3].hash`), or of the deepest part of
/// the path that exists. Object member names that contain dots are matched against the members
/// actually present.
pub fn locate(text: &[u8], field: &str) -> Option<usize> {
    Locator::new(text).locate(field)
}

/// [`locate`] for many fields of one text: each object or array is scanned once, however many
/// fields lie inside it.
pub struct Locator<'t> {
    text: &'t [u8],
    root: Option<Span>,
    children: HashMap<usize, Children>,
}

enum Children {
    Members(Vec<Member>),
    Elements(Vec<Span>),
}

impl<'t> Locator<'t> {
    pub fn new(text: &'t [u8]) -> Self {
        Locator { text, root: value_at(text, 0).ok(), children: HashMap::new() }
    }

    fn children(&mut self, span: Span) -> Option<&Children> {
        let text = self.text;
        if let Entry::Vacant(slot) = self.children.entry(span.start) {
            slot.insert(match text.get(span.start) {
                Some(b'{') => Children::Members(members(text, span.start).ok()?.0),
                Some(b'[') => Children::Elements(elements(text, span.start).ok()?.0),
                _ => return None,
            });
        }
        self.children.get(&span.start)
    }

    pub fn locate(&mut self, field: &str) -> Option<usize> {
        let mut span = self.root?;
        let mut rest = field;
        while !rest.is_empty() {
            rest = rest.strip_prefix('.').unwrap_or(rest);
            let next = match self.children(span) {
                Some(Children::Members(members)) => {
                    let found = members
                        .iter()
                        .filter(|m| {
                            rest.strip_prefix(m.name.as_str())
                                .is_some_and(|after| after.is_empty() || after.starts_with(['.', '[']))
                        })
                        .max_by_key(|m| m.name.len());
                    match found {
                        Some(m) => {
                            rest = rest.get(m.name.len()..).unwrap_or_default();
                            m.value
                        }
                        None => break,
                    }
                }
                Some(Children::Elements(elements)) => {
                    let Some(inner) = rest.strip_prefix('[') else { break };
                    let Some((index, after)) = inner.split_once(']') else { break };
                    let Ok(index) = index.parse::<usize>() else { break };
                    match elements.get(index) {
                        Some(e) => {
                            rest = after;
                            *e
                        }
                        None => break,
                    }
                }
                None => break,
            };
            span = next;
        }
        Some(span.start)
    }
}

/// The 1-based line of byte `at`.
pub fn line_of(text: &[u8], at: usize) -> usize {
    text.get(..at).map_or(0, |head| head.iter().filter(|&&c| c == b'\n').count()) + 1
}

/// Re-indents JSON text with two spaces per level, keeping member order and every scalar exactly
/// as written. Below the top level, a container that fits in `INLINE_WIDTH` columns stays on one line.
pub fn pretty(text: &[u8]) -> Result<String, String> {
    let span = value_at(text, 0)?;
    let mut out = String::new();
    write_pretty(text, span, 0, 0, &mut out)?;
    out.push('\n');
    Ok(out)
}

/// One-line JSON with a space after each `,` and `:`, for key records.
pub fn inline(text: &[u8]) -> Result<String, String> {
    let span = value_at(text, 0)?;
    let mut out = String::new();
    write_inline(text, span, &mut out)?;
    Ok(out)
}

const INLINE_WIDTH: usize = 100;

fn raw(text: &[u8], span: Span) -> Result<&str, String> {
    text.get(span.start..span.end).and_then(|b| std::str::from_utf8(b).ok()).ok_or_else(|| unexpected(span.start))
}

fn write_inline(text: &[u8], span: Span, out: &mut String) -> Result<(), String> {
    match text.get(span.start) {
        Some(b'{') => {
            out.push('{');
            for (i, m) in members(text, span.start)?.0.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                let name = Span { start: m.name_start, end: string_end(text, m.name_start)? };
                out.push_str(raw(text, name)?);
                out.push_str(": ");
                write_inline(text, m.value, out)?;
            }
            out.push('}');
        }
        Some(b'[') => {
            out.push('[');
            for (i, e) in elements(text, span.start)?.0.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_inline(text, *e, out)?;
            }
            out.push(']');
        }
        _ => out.push_str(raw(text, span)?),
    }
    Ok(())
}

fn write_pretty(text: &[u8], span: Span, level: usize, lead: usize, out: &mut String) -> Result<(), String> {
    let container = matches!(text.get(span.start), Some(b'{' | b'['));
    // The top level always opens up; below it, what fits on the line stays on one line.
    if !container || level > 0 {
        let mut one_line = String::new();
        write_inline(text, span, &mut one_line)?;
        if !container || lead + one_line.len() <= INLINE_WIDTH {
            out.push_str(&one_line);
            return Ok(());
        }
    }
    let pad = |n: usize| "  ".repeat(n);
    let inner = 2 * (level + 1);
    if text.get(span.start) == Some(&b'{') {
        let members = members(text, span.start)?.0;
        if members.is_empty() {
            out.push_str("{}");
            return Ok(());
        }
        out.push('{');
        for (i, m) in members.iter().enumerate() {
            let _ = write!(out, "{}\n{}", if i > 0 { "," } else { "" }, pad(level + 1));
            let name = raw(text, Span { start: m.name_start, end: string_end(text, m.name_start)? })?;
            out.push_str(name);
            out.push_str(": ");
            write_pretty(text, m.value, level + 1, inner + name.len() + 3, out)?;
        }
        let _ = write!(out, "\n{}}}", pad(level));
    } else {
        let elements = elements(text, span.start)?.0;
        if elements.is_empty() {
            out.push_str("[]");
            return Ok(());
        }
        out.push('[');
        for (i, e) in elements.iter().enumerate() {
            let _ = write!(out, "{}\n{}", if i > 0 { "," } else { "" }, pad(level + 1));
            write_pretty(text, *e, level + 1, inner + 1, out)?;
        }
        let _ = write!(out, "\n{}]", pad(level));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_elements_give_exact_spans() {
        let text = br#" { "a" : [1, {"b":"x\"y"}] , "\u0063": true } "#;
        let (m, end) = members(text, 1).unwrap();
        assert_eq!(end, text.len() - 1);
        assert_eq!(m[0].name, "a");
        assert_eq!(m[1].name, "c");
        assert_eq!(&text[m[1].value.start..m[1].value.end], b"true");
        let (e, _) = elements(text, m[0].value.start).unwrap();
        assert_eq!(&text[e[1].start..e[1].end], br#"{"b":"x\"y"}"#);
    }

    #[test]
    fn locate_finds_the_deepest_existing_part_of_a_path() {
        let text = br#"{"keys": [{"id": "a"}, {"id": "b", "attributes": {"a.b": "x"}}]}"#;
        let at = |f: &str| locate(text, f).map(|i| text[i]);
        assert_eq!(locate(text, "keys[1].id"), Some(30));
        assert_eq!(at("keys[1].attributes.a.b"), Some(b'"'));
        assert_eq!(locate(text, "keys[1].attributes.a.b"), Some(57));
        assert_eq!(at("keys[5].id"), Some(b'['));
        assert_eq!(at(""), Some(b'{'));
    }

    #[test]
    fn pretty_keeps_order_and_scalars_and_keeps_what_fits_on_one_line() {
        let text = br#"{"z":1.50,"a":{"y":[ "s1","s2" ],"x":{}},"long":["aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"]}"#;
        let want = "{\n  \"z\": 1.50,\n  \"a\": {\"y\": [\"s1\", \"s2\"], \"x\": {}},\n  \"long\": [\n    \"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\",\n    \"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb\"\n  ]\n}\n";
        assert_eq!(pretty(text).unwrap(), want);
        assert_eq!(inline(br#"{"a":[1,2],"b":{"c":null}}"#).unwrap(), r#"{"a": [1, 2], "b": {"c": null}}"#);
    }

    #[test]
    fn indentation_is_known_only_at_the_start_of_a_line() {
        let text = b"[\n    {},\n  x {}]";
        assert_eq!(indent_before(text, 6), Some("    "));
        assert_eq!(indent_before(text, 15), None);
        assert_eq!(line_of(text, 6), 2);
    }
}
