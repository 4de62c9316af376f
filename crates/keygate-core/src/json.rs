//! Reading configuration JSON with serde: the one place where a serde error becomes a
//! [`ConfigError`] (its kind, the field, the position), and objects that refuse a name given twice.

mod proxy;

use crate::error::{ConfigError, ErrorKind, Position};
use crate::jsonpath::{offset_of, path_at, Reported};
use proxy::{Proxy, Tag};
use serde::{Deserialize, Deserializer};
use serde_json::error::Category;
use std::collections::BTreeMap;
use std::fmt;

/// Parses JSON text into `T`; reading stops at the first problem, which names its field.
pub fn parse_json<T: for<'de> Deserialize<'de>>(text: &[u8]) -> Result<T, ConfigError> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::of_kind(ErrorKind::Syntax, "", "configuration is empty; expected a JSON object"));
    }
    // serde would also read a struct from a JSON array; a configuration is an object.
    if text.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::of_kind(ErrorKind::Type, "", "expected a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    proxy::begin();
    let value = T::deserialize(Proxy(&mut de)).map_err(|r| classify(text, &r.into_inner(), proxy::last_tag()))?;
    de.end().map_err(|e| {
        let (reason, position) = split_position(&e);
        let mut error = ConfigError::of_kind(ErrorKind::Syntax, "", reason);
        error.position = position;
        error
    })?;
    Ok(value)
}

/// The kind, field and position of a serde_json error, given the tag of the constructor that made
/// it (if one of [`proxy`]'s did).
fn classify(text: &[u8], e: &serde_json::Error, tag: Option<Tag>) -> ConfigError {
    let reported = match e.classify() {
        Category::Syntax => Reported::Syntax,
        Category::Eof => Reported::Eof,
        Category::Data | Category::Io => Reported::Data,
    };
    let mut field = path_at(text, offset_of(text, e.line(), e.column()), reported);
    let kind = match (reported, tag) {
        (Reported::Syntax | Reported::Eof, _) => ErrorKind::Syntax,
        // serde_json checks the next token against what the visitor expects, itself.
        (Reported::Data, None | Some(Tag::Type)) => ErrorKind::Type,
        (Reported::Data, Some(Tag::Invalid)) => ErrorKind::Invalid,
        (Reported::Data, Some(Tag::Missing(name))) => ErrorKind::Missing { name: name.to_string() },
        (Reported::Data, Some(Tag::Unknown(allowed))) => ErrorKind::Unknown { allowed },
        (Reported::Data, Some(Tag::RepeatedName)) => ErrorKind::Duplicate { of: field.clone() },
        (Reported::Data, Some(Tag::DuplicateField)) => {
            // Raised by the object once the repeated key is read: it is the object's error.
            let of = field.clone();
            field.truncate(field.rfind(['.', '[']).unwrap_or(0));
            ErrorKind::Duplicate { of }
        }
    };
    let (reason, position) = split_position(e);
    let mut error = ConfigError::of_kind(kind, field, reason);
    error.position = position;
    error
}

/// serde_json's text of an error without the ` at line L column C` it ends with, and that position.
///
/// serde_json gives the line and column as data but its message only as this text, so this is the
/// one place that reads it, and only to take off what its own `line()` and `column()` say it
/// appended. Should that ever not match, the whole text is kept with no position: what an error
/// shows stays serde_json's text either way.
fn split_position(e: &serde_json::Error) -> (String, Option<Position>) {
    let text = e.to_string();
    let position = Position { line: e.line(), column: e.column() };
    let suffix = format!(" at line {} column {}", position.line, position.column);
    match text.strip_suffix(&suffix) {
        Some(reason) if position.line > 0 => (reason.to_string(), Some(position)),
        _ => (text, None),
    }
}

/// The error for a name given twice in one object: [`ErrorKind::Duplicate`] once read.
pub(crate) fn repeated_name<E: serde::de::Error>(name: &str) -> E {
    let e = E::custom(format!("repeated name {name:?}: each name may appear once"));
    proxy::note(Tag::RepeatedName);
    e
}

/// A JSON object read into a map, refusing a name given twice (serde would keep the last).
pub(crate) fn unique_names<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
where
    D: Deserializer<'de>,
    V: Deserialize<'de>,
{
    struct Names<V>(std::marker::PhantomData<V>);
    impl<'de, V: Deserialize<'de>> serde::de::Visitor<'de> for Names<V> {
        type Value = BTreeMap<String, V>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("an object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                if out.contains_key(&name) {
                    return Err(repeated_name(&name));
                }
                let value = map.next_value()?;
                out.insert(name, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Names(std::marker::PhantomData))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Read only to be refused.
    struct Doc {
        a: u16,
        #[serde(default)]
        list: Vec<Item>,
        #[serde(default, deserialize_with = "unique_names")]
        map: BTreeMap<String, String>,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // Read only to be refused.
    struct Item {
        id: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        On,
        Off,
    }

    fn error_of(text: &str) -> ConfigError {
        parse_json::<Doc>(text.as_bytes()).unwrap_err()
    }

    #[test]
    fn a_missing_field_names_the_object_and_the_field() {
        let e = error_of(r#"{"a": 1, "list": [{"id": "x"}, {}]}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("list[1]", &ErrorKind::Missing { name: "id".into() }));
        assert_eq!(e.to_string(), "list[1]: missing field `id` at line 1 column 33");
        assert_eq!(e.position, Some(Position { line: 1, column: 33 }));
        let e = error_of("{}");
        assert_eq!((e.field.as_str(), &e.kind), ("", &ErrorKind::Missing { name: "a".into() }));
    }

    #[test]
    fn an_unknown_field_or_variant_lists_the_known_ones() {
        let e = error_of(r#"{"a": 1, "list": [{"id": "x", "colour": 1}]}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("list[0].colour", &ErrorKind::Unknown { allowed: &["id"] }));
        assert!(e.reason().starts_with("unknown field `colour`"), "{e}");
        let e = error_of(r#"{"a": 1, "mode": "sideways"}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("mode", &ErrorKind::Unknown { allowed: &["on", "off"] }));
    }

    #[test]
    fn a_wrong_type_or_value_is_told_apart() {
        let e = error_of(r#"{"a": "one"}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("a", &ErrorKind::Type));
        assert_eq!(e.reason(), "invalid type: string \"one\", expected u16");
        let e = error_of(r#"{"a": 1, "list": [7]}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("list[0]", &ErrorKind::Type));
        let e = error_of(r#"{"a": 70000}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("a", &ErrorKind::Invalid));
        assert_eq!(e.to_string(), "a: invalid value: integer `70000`, expected u16 at line 1 column 11");
    }

    #[test]
    fn a_field_or_name_given_twice_is_a_duplicate() {
        let e = error_of(r#"{"a": 1, "a": 2}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("", &ErrorKind::Duplicate { of: "a".into() }));
        assert_eq!(e.to_string(), "duplicate field `a` at line 1 column 12");
        let e = error_of(r#"{"a": 1, "list": [{"id": "x", "id": "y"}]}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("list[0]", &ErrorKind::Duplicate { of: "list[0].id".into() }));
        let e = error_of(r#"{"a": 1, "map": {"k": "x", "k": "y"}}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("map.k", &ErrorKind::Duplicate { of: "map.k".into() }));
        assert_eq!(e.reason(), "repeated name \"k\": each name may appear once");
    }

    #[test]
    fn bad_json_is_a_syntax_error_with_its_line_and_column() {
        let e = error_of("{\n  \"a\": 1,\n  \"list\": [\n}");
        assert_eq!((e.field.as_str(), &e.kind), ("list[0]", &ErrorKind::Syntax));
        assert_eq!(e.position, Some(Position { line: 4, column: 1 }));
        assert_eq!(e.reason(), "expected value");
        let e = error_of(r#"{"a": 1"#);
        assert_eq!((&e.kind, e.position), (&ErrorKind::Syntax, Some(Position { line: 1, column: 7 })));
        assert_eq!(e.to_string(), "EOF while parsing an object at line 1 column 7");
        let e = error_of(r#"{"a": 1} {}"#);
        assert_eq!((e.field.as_str(), &e.kind), ("", &ErrorKind::Syntax));
        assert_eq!(e.to_string(), "trailing characters at line 1 column 10");
        assert_eq!(error_of(" ").kind, ErrorKind::Syntax);
        assert_eq!((error_of("[]").kind, error_of("[]").position), (ErrorKind::Type, None));
    }
}
