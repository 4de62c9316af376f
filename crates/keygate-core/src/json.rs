//! Reading configuration JSON with serde: the field of the first error, and objects that refuse a
//! name given twice.

use crate::error::ConfigError;
use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::fmt;

/// Marks a compile error raised inside serde, so [`parse_json`] reports its own field and message.
pub(crate) const COMPILE_ERROR: char = '\u{0}';

/// Parses JSON text into `T`, naming the field of the first error.
pub fn parse_json<T: for<'de> Deserialize<'de>>(text: &[u8]) -> Result<T, ConfigError> {
    if text.iter().all(u8::is_ascii_whitespace) {
        return Err(ConfigError::new("", "configuration is empty; expected a JSON object"));
    }
    // serde would also read a struct from a JSON array; a configuration is an object.
    if text.iter().find(|c| !c.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ConfigError::new("", "expected a JSON object"));
    }
    let mut de = serde_json::Deserializer::from_slice(text);
    let value = T::deserialize(&mut de).map_err(|e| {
        use crate::jsonpath::{offset_of, path_at, Reported};
        let reported = match e.classify() {
            serde_json::error::Category::Syntax => Reported::Syntax,
            serde_json::error::Category::Eof => Reported::Eof,
            serde_json::error::Category::Data | serde_json::error::Category::Io => Reported::Data,
        };
        let message = e.to_string();
        if let Some(compiled) = message.strip_prefix(COMPILE_ERROR) {
            // A key record refused while being read: its own field and message, without the position.
            let (field, rest) = compiled.split_once(COMPILE_ERROR).unwrap_or(("", compiled));
            let message = rest.rsplit_once(" at line ").map_or(rest, |(m, _)| m);
            return ConfigError::new(field, message);
        }
        let mut field = path_at(text, offset_of(text, e.line(), e.column()), reported);
        if message.starts_with("duplicate field") {
            // Raised by the object once the repeated key is read: it is the object's error.
            let parent = field.rfind(['.', '[']).map_or(0, |at| at);
            field.truncate(parent);
        }
        ConfigError::new(field, message)
    })?;
    de.end().map_err(|e| ConfigError::new("", e.to_string()))?;
    Ok(value)
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
                    return Err(serde::de::Error::custom(format!("repeated name {name:?}: each name may appear once")));
                }
                let value = map.next_value()?;
                out.insert(name, value);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Names(std::marker::PhantomData))
}
