//! The plugin configuration: raw serde structures, and the steps that compile them (the whole is
//! put together by [`Plugin::compile`](crate::plugin::Plugin::compile)).
//!
//! Every rejection names the field it is about (`keys[3].hash: expected 64 hex characters`).

use crate::checks::{check_header_name, check_scope, same_to_cgi};
use crate::credential::{CredentialHeader, KeyFormat};
use crate::error::ConfigError;
use crate::json::unique_names;
use crate::keys::record::InlineKeys;
use crate::live::RawKeySet;
use crate::policy::{Route, Upstream};
use crate::reply::{BodyTemplate, DenyKind, Replies, ReplySpec, Template};
use crate::routes::PathPattern;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use std::collections::BTreeMap;

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

pub(crate) fn compile_credential_headers(names: Option<&[String]>) -> Result<Vec<CredentialHeader>, ConfigError> {
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

pub(crate) fn compile_format(raw: &RawCredential) -> Result<KeyFormat, ConfigError> {
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

pub(crate) fn compile_route(raw: &RawRoute, field: &str) -> Result<Route, ConfigError> {
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
pub(crate) fn check_no_route_shadowed(routes: &[Route]) -> Result<(), ConfigError> {
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

pub(crate) fn compile_upstream(raw: &RawUpstream, credentials: &[CredentialHeader]) -> Result<Upstream, ConfigError> {
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

pub(crate) fn compile_errors(raw: &RawErrors, credentials: &[CredentialHeader]) -> Result<Replies, ConfigError> {
    let default_body = serde_json::json!({"error": "{code}", "message": "{message}"});
    let body = raw.body.as_ref().unwrap_or(&default_body);
    let mut specs: Vec<ReplySpec> = Vec::with_capacity(DenyKind::ALL.len());
    for kind in DenyKind::ALL {
        let field = format!("errors.{}", kind.name());
        // A revoked key answers exactly like an unknown one unless configured otherwise.
        let inherited = (kind == DenyKind::RevokedKey).then(|| raw.kind(DenyKind::InvalidKey)).flatten();
        let own = raw.kind(kind);
        let status = pick(own, inherited, |d| d.status.as_ref()).copied().unwrap_or_else(|| kind.default_status());
        if !(400..=599).contains(&status) {
            return Err(ConfigError::new(format!("{field}.status"), "must be between 400 and 599"));
        }
        let code: String =
            pick(own, inherited, |d| d.code.as_ref()).cloned().unwrap_or_else(|| kind.default_code().to_string());
        let message_text: String =
            pick(own, inherited, |d| d.message.as_ref()).cloned().unwrap_or_else(|| kind.default_message(credentials));
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

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
