//! The JSON path (`keys[3].hash`) of a position in a JSON text, so a serde error, which serde_json
//! gives as a line and column, can name the field it is about.
//!
//! A scan up to the position, tracking the objects and arrays it is inside: cheaper in code size and
//! in reading time than tracking the path of every value read (the layer in `json` that tells an
//! error's kind keeps nothing per value), and the same answer for the errors serde reports (an
//! unknown field is reported just after its key, a wrong value just after the value, a missing field
//! just after the object that lacks it).
//!
//! Both scans here are one pass over the text, whatever its shape: an error path must cost no more
//! than reading the document did (a path rendered at every closing bracket made a 2 MiB body of
//! nested arrays take seconds).

#[derive(Debug)]
enum Frame {
    /// `done`: the current key's value is complete.
    Object {
        key: Option<String>,
        done: bool,
    },
    Array {
        index: usize,
        started: bool,
    },
}

/// What kind of error the path is for: they are reported at different points of the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reported {
    /// A value of the wrong shape, an unknown or missing field: reported just past what it is about.
    Data,
    /// Bad JSON: reported at the offending character, where a value or separator was expected.
    Syntax,
    /// The text ended early.
    Eof,
}

/// The path at byte `offset` of `text` for an error of kind `reported`; `""` for the root.
pub fn path_at(text: &[u8], offset: usize, reported: Reported) -> String {
    // A syntax error is about the offending character, which belongs to no path yet.
    let end = if reported == Reported::Syntax { offset.saturating_sub(1) } else { offset }.min(text.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < end {
        let Some(&c) = text.get(i) else { break };
        match c {
            b'"' => {
                let start = i + 1;
                i = skip_string(text, i);
                let is_key = matches!(stack.last(), Some(Frame::Object { .. }))
                    && text.get(i..).is_some_and(|rest| rest.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b':'));
                if is_key {
                    let raw = text.get(start..i.saturating_sub(1)).unwrap_or_default();
                    if let Some(Frame::Object { key, done }) = stack.last_mut() {
                        *key = Some(String::from_utf8_lossy(raw).into_owned());
                        *done = false;
                    }
                } else {
                    value_done(&mut stack);
                }
                continue;
            }
            b'{' => {
                mark_started(&mut stack);
                stack.push(Frame::Object { key: None, done: false });
            }
            b'[' => {
                mark_started(&mut stack);
                stack.push(Frame::Array { index: 0, started: false });
            }
            b'}' | b']' => {
                // Just past a closing bracket, a data error is about the container itself: the path
                // is the stack the bracket leaves, rendered once at the end (`value_done` changes
                // nothing a data error's path shows).
                stack.pop();
                value_done(&mut stack);
            }
            b',' => {
                if let Some(Frame::Array { index, .. }) = stack.last_mut() {
                    *index += 1;
                }
            }
            c if c.is_ascii_whitespace() || c == b':' => {}
            _ => {
                mark_started(&mut stack);
                // A number, `true`, `false` or `null` ends where the next separator starts.
                let next = text.get(i + 1).copied().unwrap_or(b',');
                if matches!(next, b',' | b'}' | b']') || next.is_ascii_whitespace() {
                    value_done(&mut stack);
                }
            }
        }
        i += 1;
    }
    render(&stack, reported)
}

/// The offset of the first `[` or `{` that opens a container more than `max` levels deep, if any.
/// One pass, no allocation: run before a parser that would otherwise recurse that deep.
pub fn too_deep(text: &[u8], max: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&c) = text.get(i) {
        match c {
            b'"' => {
                i = skip_string(text, i);
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Some(i);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    None
}

/// The byte offset just past the character at a 1-based line and column: serde_json reports an error
/// at the last character it read, counting columns in bytes.
pub fn offset_of(text: &[u8], line: usize, column: usize) -> usize {
    let mut start = 0;
    for _ in 1..line {
        match text.get(start..).and_then(|rest| rest.iter().position(|&c| c == b'\n')) {
            Some(nl) => start += nl + 1,
            None => return text.len(),
        }
    }
    start + column
}

fn mark_started(stack: &mut [Frame]) {
    if let Some(Frame::Array { started, .. }) = stack.last_mut() {
        *started = true;
    }
}

fn value_done(stack: &mut [Frame]) {
    if let Some(Frame::Object { done, .. }) = stack.last_mut() {
        *done = true;
    }
}

/// Index just past the string starting at `text[at] == b'"'`.
fn skip_string(text: &[u8], at: usize) -> usize {
    let mut i = at + 1;
    while let Some(&c) = text.get(i) {
        i += 1;
        match c {
            b'\\' => i += 1,
            b'"' => break,
            _ => {}
        }
    }
    i
}

/// The path of the innermost position. A data error names a key whose value is complete (it is
/// reported just past that value); a syntax or EOF error does not (it is about what comes next), and
/// in an array it names the element being read when a syntax error interrupted it.
fn render(stack: &[Frame], reported: Reported) -> String {
    let mut out = String::new();
    let last = stack.len().saturating_sub(1);
    for (depth, frame) in stack.iter().enumerate() {
        match frame {
            Frame::Object { key: Some(k), done } if reported == Reported::Data || !done || depth < last => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Frame::Object { .. } => {}
            Frame::Array { index, started } => {
                if *started || (reported == Reported::Syntax && depth == last) {
                    out.push_str(&format!("[{index}]"));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str, needle: &str) -> String {
        let offset = text.find(needle).unwrap() + needle.len();
        path_at(text.as_bytes(), offset, Reported::Data)
    }

    #[test]
    fn paths_of_keys_values_and_closed_objects() {
        let t = r#"{"keys": [{"id": "a", "hash": "x"}, {"id": "b", "secret": "s"}], "errors": {"forbidden": {"status": 2}}}"#;
        assert_eq!(at(t, r#""secret""#), "keys[1].secret");
        assert_eq!(at(t, r#""hash": "x""#), "keys[0].hash");
        assert_eq!(at(t, r#""hash": "x"}"#), "keys[0]");
        assert_eq!(at(t, r#""status": 2"#), "errors.forbidden.status");
        assert_eq!(at(t, r#"{"#), "");
        assert_eq!(path_at(t.as_bytes(), t.len(), Reported::Data), "");
    }

    #[test]
    fn strings_with_quotes_and_brackets_do_not_confuse_it() {
        let t = r#"{"a": "x\"]}{,", "b": [1, [2, 3], {"c": "}"}]}"#;
        assert_eq!(at(t, r#""c": "}""#), "b[2].c");
        assert_eq!(at(t, r#"[2, 3]"#), "b[1]");
    }

    #[test]
    fn syntax_and_eof_errors_name_what_was_being_read() {
        let eof = |t: &str| path_at(t.as_bytes(), t.len(), Reported::Eof);
        assert_eq!(eof(r#"{"keys": ["#), "keys");
        assert_eq!(eof(r#"{"keys": []"#), "");
        assert_eq!(eof(r#"{"keys": [{"id": "a""#), "keys[0]");
        let bad = "{\n  \"keys\": [\n}";
        assert_eq!(path_at(bad.as_bytes(), offset_of(bad.as_bytes(), 3, 1), Reported::Syntax), "keys[0]");
        // A missing comma: serde_json reports the `"` of "b" (column 9); the error is the object's.
        let bad = r#"{"a": 1 "b": 2}"#;
        assert_eq!(path_at(bad.as_bytes(), offset_of(bad.as_bytes(), 1, 9), Reported::Syntax), "");
    }

    #[test]
    fn line_and_column_become_an_offset() {
        let t = b"{\n  \"a\": 1,\n  \"b\": 2\n}";
        assert_eq!(offset_of(t, 3, 8), 20);
        assert_eq!(path_at(t, offset_of(t, 3, 8), Reported::Data), "b");
    }

    /// `{"version": [` and `[[…]]` elements 100 deep until `len` bytes, then `]}`.
    fn nested(len: usize) -> Vec<u8> {
        let mut text = br#"{"version": ["#.to_vec();
        let unit = format!("{}{},", "[".repeat(100), "]".repeat(100));
        while text.len() < len {
            text.extend_from_slice(unit.as_bytes());
        }
        text.extend_from_slice(b"[]]}");
        text
    }

    #[test]
    fn a_path_deep_in_megabytes_of_nested_arrays_costs_one_pass() {
        // A path used to be rendered at every closing bracket: 4 s for this body on the host.
        let text = nested(2 << 20);
        let start = std::time::Instant::now();
        assert_eq!(path_at(&text, text.len() - 1, Reported::Data), "version");
        assert_eq!(path_at(&text, text.len(), Reported::Eof), "");
        let took = start.elapsed();
        assert!(took < std::time::Duration::from_millis(500), "two scans of 2 MiB took {took:?}");
    }

    #[test]
    fn too_deep_finds_the_first_bracket_past_the_limit() {
        assert_eq!(too_deep(br#"{"a": [[1]]}"#, 3), None);
        assert_eq!(too_deep(br#"{"a": [[1]]}"#, 2), Some(7));
        assert_eq!(too_deep(br#"{"a": "[[[[", "b": {}}"#, 2), None, "brackets in strings do not count");
        assert_eq!(too_deep(br#"[[],[],[[]]]"#, 2), Some(8));
        let text = nested(1 << 20);
        assert_eq!(too_deep(&text, 8), Some(19));
        assert_eq!(too_deep(&text, 102), None);
        assert_eq!(too_deep(&text, 101), Some(112));
    }
}
