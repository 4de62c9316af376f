//! The JSON path (`keys[3].hash`) of a position in a JSON text, so a serde error, which serde_json
//! gives as a line and column, can name the field it is about.
//!
//! A scan up to the position, tracking the objects and arrays it is inside: cheaper in code size than
//! wrapping every deserializer to track paths, and the same answer for the errors serde reports (an
//! unknown field is reported just after its key, a wrong value just after the value, a missing field
//! just after the object that lacks it).

#[derive(Debug)]
enum Frame {
    Object { key: Option<String> },
    Array { index: usize, started: bool },
}

/// The path at byte `offset` of `text`; `""` for the root.
pub fn path_at(text: &[u8], offset: usize) -> String {
    let end = offset.min(text.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut closed: Option<String> = None;
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
                    if let Some(Frame::Object { key }) = stack.last_mut() {
                        *key = Some(String::from_utf8_lossy(raw).into_owned());
                    }
                }
                closed = None;
                mark_value(&mut stack);
                continue;
            }
            b'{' => {
                mark_value(&mut stack);
                stack.push(Frame::Object { key: None });
                closed = None;
            }
            b'[' => {
                mark_value(&mut stack);
                stack.push(Frame::Array { index: 0, started: false });
                closed = None;
            }
            b'}' | b']' => {
                // Just past a closing bracket, the path is the container's own.
                stack.pop();
                closed = Some(render(&stack));
            }
            b',' => {
                if let Some(Frame::Array { index, .. }) = stack.last_mut() {
                    *index += 1;
                }
                closed = None;
            }
            c if c.is_ascii_whitespace() || c == b':' => {}
            _ => {
                closed = None;
                mark_value(&mut stack);
            }
        }
        i += 1;
    }
    closed.unwrap_or_else(|| render(&stack))
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

fn mark_value(stack: &mut [Frame]) {
    if let Some(Frame::Array { started, .. }) = stack.last_mut() {
        *started = true;
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

fn render(stack: &[Frame]) -> String {
    let mut out = String::new();
    for frame in stack {
        match frame {
            Frame::Object { key: Some(k) } => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Frame::Object { key: None } => {}
            Frame::Array { index, started } => {
                if *started {
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
        path_at(text.as_bytes(), offset)
    }

    #[test]
    fn paths_of_keys_values_and_closed_objects() {
        let t = r#"{"keys": [{"id": "a", "hash": "x"}, {"id": "b", "secret": "s"}], "errors": {"forbidden": {"status": 2}}}"#;
        assert_eq!(at(t, r#""secret""#), "keys[1].secret");
        assert_eq!(at(t, r#""hash": "x""#), "keys[0].hash");
        assert_eq!(at(t, r#""hash": "x"}"#), "keys[0]");
        assert_eq!(at(t, r#""status": 2"#), "errors.forbidden.status");
        assert_eq!(at(t, r#"{"#), "");
        assert_eq!(path_at(t.as_bytes(), t.len()), "");
    }

    #[test]
    fn strings_with_quotes_and_brackets_do_not_confuse_it() {
        let t = r#"{"a": "x\"]}{,", "b": [1, [2, 3], {"c": "}"}]}"#;
        assert_eq!(at(t, r#""c": "}""#), "b[2].c");
        assert_eq!(at(t, r#"[2, 3]"#), "b[1]");
    }

    #[test]
    fn line_and_column_become_an_offset() {
        let t = b"{\n  \"a\": 1,\n  \"b\": 2\n}";
        assert_eq!(offset_of(t, 3, 8), 20);
        assert_eq!(path_at(t, offset_of(t, 3, 8)), "b");
    }
}
