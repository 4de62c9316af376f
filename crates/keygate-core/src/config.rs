//! The plugin configuration: raw serde structures, compiled once into a [`Policy`].
//!
//! Every rejection names the field it is about (`keys[3].hash: expected 64 hex characters`).

use crate::credential::{CredentialHeader, KeyFormat};
use crate::keys::{Key, KeyHash, KeySet};
use crate::live::{KeySetConfig, RawKeySet};
use crate::policy::{same_to_cgi, Policy, Route, Upstream};
use crate::reply::{BodyTemplate, DenyKind, Replies, ReplySpec, Template};
use crate::routes::PathPattern;
use crate::scopes::ScopeRules;
use crate::time::parse_rfc3339;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// A configuration problem, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub credential: RawCredential,
    #[serde(default)]
    pub keys: InlineKeys,
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    #[serde(default)]
    pub unmatched: Unmatched,
    #[serde(default, deserialize_with = "unique_names")]
    pub scope_implies: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    pub upstream: RawUpstream,
    #[serde(default)]
    pub errors: RawErrors,
    pub key_set: Option<RawKeySet>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCredential {
    pub headers: Option<Vec<String>>,
    pub prefixes: Option<Vec<String>>,
    pub max_length: Option<usize>,
}

/// A key record, as written in `keys` (and in key-set files).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    pub hash: String,
    pub org: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty", deserialize_with = "unique_names")]
    pub attributes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Expiry>,
    #[serde(default)]
    pub revoked: bool,
}

/// `expires_at`: RFC 3339 text or integer Unix seconds.
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
pub enum Expiry {
    UnixSeconds(i64),
    Text(String),
}

/// Read by type, not as an untagged enum: serde would first buffer whatever value stands there (a
/// megabyte of nested arrays, say) to try each variant on it, then report an error past its end.
/// This refuses anything else at its first character.
impl<'de> Deserialize<'de> for Expiry {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either;
        impl serde::de::Visitor<'_> for Either {
            type Value = Expiry;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("RFC 3339 text or integer Unix seconds")
            }

            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Expiry, E> {
                Ok(Expiry::UnixSeconds(v))
            }

            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Expiry, E> {
                i64::try_from(v)
                    .map(Expiry::UnixSeconds)
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Expiry, E> {
                Ok(Expiry::Text(v.to_string()))
            }
        }
        d.deserialize_any(Either)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub methods: Option<Vec<String>>,
    pub path: String,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default, deserialize_with = "unique_names")]
    pub bind: BTreeMap<String, String>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    #[default]
    Authenticate,
    Deny,
}

/// A header name that may be left out (default), given, or `null` (disabled).
type HeaderSetting = Option<Option<String>>;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    pub strip_credentials: Option<bool>,
    #[serde(default, deserialize_with = "present")]
    pub org_header: HeaderSetting,
    #[serde(default, deserialize_with = "present")]
    pub key_id_header: HeaderSetting,
    #[serde(default, deserialize_with = "present")]
    pub scopes_header: HeaderSetting,
    #[serde(default, deserialize_with = "unique_names")]
    pub attribute_headers: BTreeMap<String, Option<String>>,
}

/// A JSON object read into a map, refusing a name given twice (serde would keep the last).
fn unique_names<'de, D, V>(d: D) -> Result<BTreeMap<String, V>, D::Error>
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

/// Tells a field given as `null` (`Some(None)`) from a field left out (`None`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<HeaderSetting, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawErrors {
    pub body: Option<Value>,
    pub missing_key: Option<RawDeny>,
    pub invalid_key: Option<RawDeny>,
    pub revoked_key: Option<RawDeny>,
    pub expired_key: Option<RawDeny>,
    pub insufficient_scope: Option<RawDeny>,
    pub forbidden: Option<RawDeny>,
    pub key_set_unavailable: Option<RawDeny>,
}

impl RawErrors {
    fn kind(&self, kind: DenyKind) -> Option<&RawDeny> {
        match kind {
            DenyKind::MissingKey => self.missing_key.as_ref(),
            DenyKind::InvalidKey => self.invalid_key.as_ref(),
            DenyKind::RevokedKey => self.revoked_key.as_ref(),
            DenyKind::ExpiredKey => self.expired_key.as_ref(),
            DenyKind::InsufficientScope => self.insufficient_scope.as_ref(),
            DenyKind::Forbidden => self.forbidden.as_ref(),
            DenyKind::KeySetUnavailable => self.key_set_unavailable.as_ref(),
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeny {
    pub status: Option<u16>,
    pub code: Option<String>,
    pub message: Option<String>,
    pub body: Option<Value>,
}

pub const DEFAULT_MAX_LENGTH: usize = 256;

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

impl Policy {
    /// Parses and compiles a plugin configuration.
    pub fn from_json(text: &[u8]) -> Result<Policy, ConfigError> {
        compile(parse_json::<RawConfig>(text)?)
    }
}

/// Compiles a parsed configuration into the policy the filter runs.
pub fn compile(raw: RawConfig) -> Result<Policy, ConfigError> {
    let credential_headers = compile_credential_headers(raw.credential.headers.as_deref())?;
    let format = compile_format(&raw.credential)?;
    let keys = raw.keys.0;
    let routes = raw
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| compile_route(r, &format!("routes[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    check_no_route_shadowed(&routes)?;
    for (scope, implied) in &raw.scope_implies {
        check_scope(scope, &format!("scope_implies.{scope}"))?;
        for (i, s) in implied.iter().enumerate() {
            check_scope(s, &format!("scope_implies.{scope}[{i}]"))?;
        }
    }
    let upstream = compile_upstream(&raw.upstream, &credential_headers)?;
    let replies = compile_errors(&raw.errors, &credential_headers)?;
    let key_set = raw.key_set.as_ref().map(KeySetConfig::compile).transpose()?;
    Ok(Policy {
        credential_headers,
        format,
        keys,
        routes_lower_ascii: routes.iter().all(|r| r.pattern.literals_are_lower_ascii()),
        routes,
        deny_unmatched: raw.unmatched == Unmatched::Deny,
        scopes: ScopeRules::new(&raw.scope_implies),
        upstream,
        replies,
        key_set,
    })
}

fn compile_credential_headers(names: Option<&[String]>) -> Result<Vec<CredentialHeader>, ConfigError> {
    let Some(names) = names else {
        return Ok(vec![CredentialHeader::new("authorization")]);
    };
    if names.is_empty() {
        return Err(ConfigError::new("credential.headers", "must list at least one header"));
    }
    let mut out: Vec<CredentialHeader> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("credential.headers[{i}]");
        check_header_name(name, &field)?;
        let header = CredentialHeader::new(name);
        if out.iter().any(|h| h.name == header.name) {
            return Err(ConfigError::new(field, format!("{name:?} is listed twice")));
        }
        out.push(header);
    }
    Ok(out)
}

fn compile_format(raw: &RawCredential) -> Result<KeyFormat, ConfigError> {
    let max_length = raw.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
    if max_length == 0 || max_length > 8192 {
        return Err(ConfigError::new("credential.max_length", "must be between 1 and 8192"));
    }
    let prefixes = raw.prefixes.clone().unwrap_or_default();
    for (i, p) in prefixes.iter().enumerate() {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_graphic() && c != b',') {
            return Err(ConfigError::new(
                format!("credential.prefixes[{i}]"),
                "must be non-empty visible ASCII without commas",
            ));
        }
    }
    if raw.prefixes.as_ref().is_some_and(Vec::is_empty) {
        return Err(ConfigError::new("credential.prefixes", "must list at least one prefix, or be left out"));
    }
    Ok(KeyFormat { prefixes, max_length })
}

/// Compiles key records; `field` names the list (`keys`, or a key-set file's `keys`).
pub fn compile_keys(raw: &[RawKey], field: &str) -> Result<KeySet, ConfigError> {
    let mut builder = KeySetBuilder::new(field, raw.len());
    for record in raw {
        builder.add(record)?;
    }
    Ok(builder.finish())
}

/// Compiles key records one at a time, in order, refusing a duplicate id or hash.
pub struct KeyChecker<'f> {
    field: &'f str,
    next: usize,
    first_of_hash: HashMap<KeyHash, usize>,
    first_of_id: HashMap<String, usize>,
}

impl<'f> KeyChecker<'f> {
    /// `field` names the list (`keys`); `capacity` is how many records to expect.
    pub fn new(field: &'f str, capacity: usize) -> Self {
        KeyChecker {
            field,
            next: 0,
            first_of_hash: HashMap::with_capacity(capacity),
            first_of_id: HashMap::with_capacity(capacity),
        }
    }

    /// Compiles the next record of the list.
    pub fn check(&mut self, record: &RawKey) -> Result<(KeyHash, Key), ConfigError> {
        let (field, i) = (self.field, self.next);
        self.next += 1;
        let here = format!("{field}[{i}]");
        let (hash, key) = compile_key(record, &here)?;
        if let Some(j) = self.first_of_id.insert(record.id.clone(), i) {
            return Err(ConfigError::new(
                format!("{here}.id"),
                format!("duplicate id {:?} (also {field}[{j}])", record.id),
            ));
        }
        if let Some(j) = self.first_of_hash.insert(hash, i) {
            return Err(ConfigError::new(format!("{here}.hash"), format!("duplicate hash (also {field}[{j}])")));
        }
        Ok((hash, key))
    }
}

/// Builds a key set from records checked one at a time.
struct KeySetBuilder<'f> {
    checker: KeyChecker<'f>,
    by_hash: HashMap<KeyHash, Key>,
}

impl<'f> KeySetBuilder<'f> {
    fn new(field: &'f str, capacity: usize) -> Self {
        KeySetBuilder { checker: KeyChecker::new(field, capacity), by_hash: HashMap::with_capacity(capacity) }
    }

    fn add(&mut self, record: &RawKey) -> Result<(), ConfigError> {
        let (hash, key) = self.checker.check(record)?;
        self.by_hash.insert(hash, key);
        Ok(())
    }

    fn finish(self) -> KeySet {
        KeySet::new(self.by_hash)
    }
}

/// The configuration's `keys`, compiled record by record while the JSON is read, so that a large
/// inline set is never held both as parsed records and as the compiled table.
#[derive(Debug, Default)]
pub struct InlineKeys(pub KeySet);

/// Marks a compile error raised inside serde, so [`parse_json`] reports its own field and message.
const COMPILE_ERROR: char = '\u{0}';

impl<'de> Deserialize<'de> for InlineKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Records;
        impl<'de> serde::de::Visitor<'de> for Records {
            type Value = InlineKeys;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of key records")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<InlineKeys, A::Error> {
                let mut builder = KeySetBuilder::new("keys", seq.size_hint().unwrap_or(0));
                while let Some(record) = seq.next_element::<RawKey>()? {
                    builder.add(&record).map_err(|e| {
                        serde::de::Error::custom(format!("{COMPILE_ERROR}{}{COMPILE_ERROR}{}", e.field, e.message))
                    })?;
                }
                Ok(InlineKeys(builder.finish()))
            }
        }
        d.deserialize_seq(Records)
    }
}

/// Checks and compiles one key record; `field` is where it stands (`keys[3]`).
pub fn compile_key(raw: &RawKey, field: &str) -> Result<(KeyHash, Key), ConfigError> {
    let at = |name: &str| format!("{field}.{name}");
    if raw.id.is_empty() || !raw.id.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::new(at("id"), "must be non-empty visible ASCII"));
    }
    let hash = parse_hash(&raw.hash).map_err(|m| ConfigError::new(at("hash"), m))?;
    check_header_value(&raw.org, &at("org"))?;
    if let Some(name) = &raw.name {
        check_header_value(name, &at("name"))?;
    }
    for (i, s) in raw.scopes.iter().enumerate() {
        check_scope(s, &at(&format!("scopes[{i}]")))?;
    }
    for (name, value) in &raw.attributes {
        if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::new(at("attributes"), "attribute names must be non-empty visible ASCII"));
        }
        check_header_value(value, &at(&format!("attributes.{name}")))?;
    }
    let expires_at_ms = match &raw.expires_at {
        None => None,
        Some(Expiry::UnixSeconds(s)) => {
            Some(s.checked_mul(1_000).ok_or_else(|| ConfigError::new(at("expires_at"), "Unix seconds out of range"))?)
        }
        Some(Expiry::Text(t)) => Some(parse_rfc3339(t).map_err(|m| ConfigError::new(at("expires_at"), m))?),
    };
    let key = Key {
        id: raw.id.clone(),
        org: raw.org.clone(),
        name: raw.name.clone(),
        scopes: raw.scopes.clone(),
        attributes: raw.attributes.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        expires_at_ms,
        revoked: raw.revoked,
    };
    Ok((hash, key))
}

/// Decodes a 64-hex-digit SHA-256, either case.
pub fn parse_hash(text: &str) -> Result<KeyHash, String> {
    let mut hash = [0u8; 32];
    if text.len() != 64 {
        return Err(format!("expected 64 hex characters (a SHA-256), got {}", text.len()));
    }
    hex::decode_to_slice(text, &mut hash).map_err(|_| "expected 64 hex characters (a SHA-256)".to_string())?;
    Ok(hash)
}

fn compile_route(raw: &RawRoute, field: &str) -> Result<Route, ConfigError> {
    let pattern = PathPattern::parse(&raw.path).map_err(|m| ConfigError::new(format!("{field}.path"), m))?;
    let methods = match &raw.methods {
        None => None,
        Some(list) if list.is_empty() => {
            return Err(ConfigError::new(format!("{field}.methods"), "must list a method, or be left out"))
        }
        Some(list) => {
            let mut methods = Vec::with_capacity(list.len() + 1);
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|c| c.is_ascii_alphabetic()) {
                    return Err(ConfigError::new(
                        format!("{field}.methods[{i}]"),
                        format!("{m:?} is not an HTTP method"),
                    ));
                }
                methods.push(m.to_ascii_uppercase());
            }
            // A server answers HEAD with its GET handler, so HEAD needs what GET needs.
            if methods.iter().any(|m| m == "GET") && !methods.iter().any(|m| m == "HEAD") {
                methods.push("HEAD".to_string());
            }
            Some(methods)
        }
    };
    for (i, s) in raw.scopes.iter().enumerate() {
        check_scope(s, &format!("{field}.scopes[{i}]"))?;
    }
    let mut bind = Vec::with_capacity(raw.bind.len());
    for (capture, attribute) in &raw.bind {
        let here = format!("{field}.bind.{capture}");
        if !pattern.has_capture(capture) {
            return Err(ConfigError::new(here, format!("the path {:?} has no {{{capture}}}", raw.path)));
        }
        if attribute.is_empty() {
            return Err(ConfigError::new(here, "must name a key attribute (or org)"));
        }
        bind.push((capture.clone(), attribute.clone()));
    }
    if raw.public && (!raw.scopes.is_empty() || !bind.is_empty()) {
        return Err(ConfigError::new(
            format!("{field}.public"),
            "a public route needs no key, so it cannot have scopes or bind",
        ));
    }
    Ok(Route { methods, pattern, scopes: raw.scopes.clone(), bind, public: raw.public })
}

/// Refuses a route that an earlier one leaves nothing to match: the first match wins, so its scopes
/// and bindings would never apply.
fn check_no_route_shadowed(routes: &[Route]) -> Result<(), ConfigError> {
    for (j, later) in routes.iter().enumerate() {
        let shadowing = routes.iter().take(j).position(|earlier| {
            let methods = match (&earlier.methods, &later.methods) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
            };
            methods && earlier.pattern.covers(&later.pattern)
        });
        if let Some(i) = shadowing {
            return Err(ConfigError::new(
                format!("routes[{j}]"),
                format!("never matches: routes[{i}] comes first and matches every request it would (the first match wins; list the narrower route first)"),
            ));
        }
    }
    Ok(())
}

fn compile_upstream(raw: &RawUpstream, credentials: &[CredentialHeader]) -> Result<Upstream, ConfigError> {
    let pick = |setting: &HeaderSetting, default: &str, field: &str| -> Result<Option<String>, ConfigError> {
        match setting {
            None => Ok(Some(default.to_string())),
            Some(None) => Ok(None),
            Some(Some(name)) => {
                check_header_name(name, field)?;
                Ok(Some(name.to_ascii_lowercase()))
            }
        }
    };
    let org_header = pick(&raw.org_header, "x-org-id", "upstream.org_header")?;
    let key_id_header = pick(&raw.key_id_header, "x-api-key-id", "upstream.key_id_header")?;
    let scopes_header = pick(&raw.scopes_header, "x-api-key-scopes", "upstream.scopes_header")?;
    let mut attribute_headers = Vec::new();
    for (attribute, header) in &raw.attribute_headers {
        if let Some(name) = header {
            check_header_name(name, &format!("upstream.attribute_headers.{attribute}"))?;
            attribute_headers.push((attribute.clone(), name.to_ascii_lowercase()));
        }
    }
    let mut named: Vec<(String, String)> = Vec::new();
    let singles = [
        ("upstream.org_header", &org_header),
        ("upstream.key_id_header", &key_id_header),
        ("upstream.scopes_header", &scopes_header),
    ];
    let all = singles
        .iter()
        .filter_map(|(f, h)| h.as_ref().map(|h| (f.to_string(), h.clone())))
        .chain(attribute_headers.iter().map(|(a, h)| (format!("upstream.attribute_headers.{a}"), h.clone())));
    for (field, name) in all {
        // `x_org_id` and `x-org-id` are one header to CGI-style servers.
        if let Some(c) = credentials.iter().find(|c| same_to_cgi(&c.name, &name)) {
            let message = if c.name == name {
                format!("{name:?} is also a credential header")
            } else {
                format!("{name:?} is also a credential header, {:?}, to servers that read '_' as '-'", c.name)
            };
            return Err(ConfigError::new(field, message));
        }
        if let Some((other, _)) = named.iter().find(|(_, n)| same_to_cgi(n, &name)) {
            return Err(ConfigError::new(field, format!("{name:?} is already used by {other}")));
        }
        named.push((field, name));
    }
    Ok(Upstream {
        strip_credentials: raw.strip_credentials.unwrap_or(true),
        org_header,
        key_id_header,
        scopes_header,
        attribute_headers,
        identity_headers: named.into_iter().map(|(_, n)| n).collect(),
    })
}

fn default_code(kind: DenyKind) -> &'static str {
    match kind {
        DenyKind::MissingKey => "missing_api_key",
        DenyKind::InvalidKey | DenyKind::RevokedKey => "invalid_api_key",
        DenyKind::ExpiredKey => "expired_api_key",
        DenyKind::InsufficientScope => "insufficient_scope",
        DenyKind::Forbidden => "forbidden",
        DenyKind::KeySetUnavailable => "key_set_unavailable",
    }
}

fn default_status(kind: DenyKind) -> u16 {
    match kind {
        DenyKind::MissingKey | DenyKind::InvalidKey | DenyKind::RevokedKey | DenyKind::ExpiredKey => 401,
        DenyKind::InsufficientScope | DenyKind::Forbidden => 403,
        DenyKind::KeySetUnavailable => 503,
    }
}

fn default_message(kind: DenyKind, credentials: &[CredentialHeader]) -> String {
    match kind {
        DenyKind::MissingKey => {
            let how: Vec<String> = credentials
                .iter()
                .map(
                    |h| if h.bearer { "Authorization: Bearer <key>".to_string() } else { format!("{}: <key>", h.name) },
                )
                .collect();
            format!("No API key was sent. Send it as {}.", how.join(" or "))
        }
        DenyKind::InvalidKey | DenyKind::RevokedKey => "The API key is invalid or has been revoked.".into(),
        DenyKind::ExpiredKey => "The API key has expired.".into(),
        DenyKind::InsufficientScope => "The API key lacks the scope this request needs: {missing_scopes}.".into(),
        DenyKind::Forbidden => "The API key may not access this resource.".into(),
        DenyKind::KeySetUnavailable => "API keys cannot be checked right now; retry shortly.".into(),
    }
}

fn compile_errors(raw: &RawErrors, credentials: &[CredentialHeader]) -> Result<Replies, ConfigError> {
    let default_body = serde_json::json!({"error": "{code}", "message": "{message}"});
    let body = raw.body.as_ref().unwrap_or(&default_body);
    let mut specs: Vec<ReplySpec> = Vec::with_capacity(DenyKind::ALL.len());
    for kind in DenyKind::ALL {
        let field = format!("errors.{}", kind.name());
        // A revoked key answers exactly like an unknown one unless configured otherwise.
        let inherited = (kind == DenyKind::RevokedKey).then(|| raw.kind(DenyKind::InvalidKey)).flatten();
        let own = raw.kind(kind);
        let status = pick(own, inherited, |d| d.status.as_ref()).copied().unwrap_or_else(|| default_status(kind));
        if !(400..=599).contains(&status) {
            return Err(ConfigError::new(format!("{field}.status"), "must be between 400 and 599"));
        }
        let code: String =
            pick(own, inherited, |d| d.code.as_ref()).cloned().unwrap_or_else(|| default_code(kind).to_string());
        let message_text: String =
            pick(own, inherited, |d| d.message.as_ref()).cloned().unwrap_or_else(|| default_message(kind, credentials));
        let message =
            Template::parse(&message_text, false).map_err(|m| ConfigError::new(format!("{field}.message"), m))?;
        let (body_value, body_field) = match pick(own, inherited, |d| d.body.as_ref()) {
            Some(v) => (v, format!("{field}.body")),
            None => (body, "errors.body".to_string()),
        };
        let body = BodyTemplate::compile(body_value).map_err(|m| ConfigError::new(body_field, m))?;
        specs.push(ReplySpec { status, code, message, body });
    }
    Ok(Replies::new(specs))
}

/// A field of a kind's own settings, else of the settings it inherits.
fn pick<'a, T>(
    own: Option<&'a RawDeny>,
    inherited: Option<&'a RawDeny>,
    field: impl Fn(&'a RawDeny) -> Option<&'a T>,
) -> Option<&'a T> {
    own.and_then(&field).or_else(|| inherited.and_then(&field))
}

fn check_header_name(name: &str, field: &str) -> Result<(), ConfigError> {
    const FORBIDDEN: [&str; 9] = [
        "host",
        "connection",
        "content-length",
        "transfer-encoding",
        "te",
        "upgrade",
        "keep-alive",
        "proxy-connection",
        "x-request-id",
    ];
    let token = !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c));
    if !token {
        return Err(ConfigError::new(field, format!("{name:?} is not a valid header name")));
    }
    if FORBIDDEN.contains(&name.to_ascii_lowercase().as_str()) {
        return Err(ConfigError::new(field, format!("{name:?} is a header keygate may not use")));
    }
    Ok(())
}

fn check_header_value(value: &str, field: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.chars().any(char::is_control) || value.trim() != value {
        return Err(ConfigError::new(field, "must be non-empty, without control characters or surrounding spaces"));
    }
    Ok(())
}

fn check_scope(scope: &str, field: &str) -> Result<(), ConfigError> {
    if scope.is_empty() || !scope.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::new(field, format!("{scope:?} is not a scope (visible ASCII, no spaces)")));
    }
    Ok(())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
