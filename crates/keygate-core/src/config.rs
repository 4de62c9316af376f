//! The plugin configuration: raw serde structures, and the steps that compile them (the whole is
//! put together by [`Plugin::compile`](crate::plugin::Plugin::compile)).
//!
//! Every rejection names the field it is about (`keys[3].hash: expected 64 hex characters`). Each
//! step goes on past a problem, keeping it in a [`Problems`], so that one compile reports them all.

use crate::checks::{check_header_name, check_scope, same_to_cgi};
use crate::credential::{CredentialHeader, KeyFormat};
use crate::error::{ConfigError, Problems};
use crate::json::unique_names;
use crate::keys::record::InlineKeys;
use crate::live::RawKeySet;
use crate::policy::{Route, Upstream};
use crate::reply::{BodyTemplate, DenyKind, Replies, ReplySpec, Template};
use crate::routes::PathPattern;
use crate::usage::RawUsage;
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
    pub usage: Option<RawUsage>,
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

/// The credential headers; those refused are left out (and kept in `problems`).
pub(crate) fn compile_credential_headers(names: Option<&[String]>, problems: &mut Problems) -> Vec<CredentialHeader> {
    let Some(names) = names else {
        return vec![CredentialHeader::new("authorization")];
    };
    if names.is_empty() {
        problems.push(ConfigError::new("credential.headers", "must list at least one header"));
    }
    let mut out: Vec<(usize, CredentialHeader)> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let field = format!("credential.headers[{i}]");
        if problems.take(check_header_name(name, &field)).is_none() {
            continue;
        }
        let header = CredentialHeader::new(name);
        if let Some((j, _)) = out.iter().find(|(_, h)| h.name == header.name) {
            let of = format!("credential.headers[{j}]");
            problems.push(ConfigError::duplicate(field, of, format!("{name:?} is listed twice")));
            continue;
        }
        out.push((i, header));
    }
    out.into_iter().map(|(_, h)| h).collect()
}

pub(crate) fn compile_format(raw: &RawCredential, problems: &mut Problems) -> KeyFormat {
    let max_length = raw.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
    if max_length == 0 || max_length > 8192 {
        problems.push(ConfigError::new("credential.max_length", "must be between 1 and 8192"));
    }
    let prefixes = raw.prefixes.clone().unwrap_or_default();
    for (i, p) in prefixes.iter().enumerate() {
        if p.is_empty() || !p.bytes().all(|c| c.is_ascii_graphic() && c != b',') {
            problems.push(ConfigError::new(
                format!("credential.prefixes[{i}]"),
                "must be non-empty visible ASCII without commas",
            ));
        }
    }
    if raw.prefixes.as_ref().is_some_and(Vec::is_empty) {
        problems.push(ConfigError::new("credential.prefixes", "must list at least one prefix, or be left out"));
    }
    KeyFormat { prefixes, max_length }
}

/// Compiles one route; `None` if it has a problem (every one of them kept in `problems`).
pub(crate) fn compile_route(raw: &RawRoute, field: &str, problems: &mut Problems) -> Option<Route> {
    let found = problems.found();
    let pattern =
        problems.take(PathPattern::parse(&raw.path).map_err(|m| ConfigError::new(format!("{field}.path"), m)));
    let methods = match &raw.methods {
        None => None,
        Some(list) if list.is_empty() => {
            problems.push(ConfigError::new(format!("{field}.methods"), "must list a method, or be left out"));
            None
        }
        Some(list) => {
            let mut methods = Vec::with_capacity(list.len() + 1);
            for (i, m) in list.iter().enumerate() {
                if m.is_empty() || !m.bytes().all(|c| c.is_ascii_alphabetic()) {
                    problems.push(ConfigError::new(
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
        problems.take(check_scope(s, &format!("{field}.scopes[{i}]")));
    }
    let mut bind = Vec::with_capacity(raw.bind.len());
    // A path that does not compile has no captures to check a binding against.
    if let Some(pattern) = &pattern {
        for (capture, attribute) in &raw.bind {
            let here = format!("{field}.bind.{capture}");
            if !pattern.has_capture(capture) {
                problems.push(ConfigError::new(here, format!("the path {:?} has no {{{capture}}}", raw.path)));
            } else if attribute.is_empty() {
                problems.push(ConfigError::new(here, "must name a key attribute (or org)"));
            } else {
                bind.push((capture.clone(), attribute.clone()));
            }
        }
    }
    if raw.public && (!raw.scopes.is_empty() || !raw.bind.is_empty()) {
        problems.push(ConfigError::new(
            format!("{field}.public"),
            "a public route needs no key, so it cannot have scopes or bind",
        ));
    }
    let pattern = pattern.filter(|_| problems.found() == found)?;
    Some(Route { methods, pattern, scopes: raw.scopes.clone(), bind, public: raw.public })
}

/// Refuses each route that an earlier one leaves nothing to match: the first match wins, so its
/// scopes and bindings would never apply. `routes` are the routes that compiled, each with its
/// index in the configuration.
pub(crate) fn check_no_route_shadowed(routes: &[(usize, Route)], problems: &mut Problems) {
    for (j, (at, later)) in routes.iter().enumerate() {
        let shadowing = routes.iter().take(j).find(|(_, earlier)| {
            let methods = match (&earlier.methods, &later.methods) {
                (None, _) => true,
                (Some(_), None) => false,
                (Some(e), Some(l)) => l.iter().all(|m| e.contains(m)),
            };
            methods && earlier.pattern.covers(&later.pattern)
        });
        if let Some((i, _)) = shadowing {
            problems.push(ConfigError::new(
                format!("routes[{at}]"),
                format!("never matches: routes[{i}] comes first and matches every request it would (the first match wins; list the narrower route first)"),
            ));
        }
    }
}

pub(crate) fn compile_upstream(
    raw: &RawUpstream,
    credentials: &[CredentialHeader],
    problems: &mut Problems,
) -> Upstream {
    // A header name refused is taken as disabled, so that it clashes with nothing.
    let mut pick = |setting: &HeaderSetting, default: &str, field: &str| -> Option<String> {
        match setting {
            None => Some(default.to_string()),
            Some(None) => None,
            Some(Some(name)) => problems.take(check_header_name(name, field)).map(|()| name.to_ascii_lowercase()),
        }
    };
    let org_header = pick(&raw.org_header, "x-org-id", "upstream.org_header");
    let key_id_header = pick(&raw.key_id_header, "x-api-key-id", "upstream.key_id_header");
    let scopes_header = pick(&raw.scopes_header, "x-api-key-scopes", "upstream.scopes_header");
    let mut attribute_headers = Vec::new();
    for (attribute, header) in &raw.attribute_headers {
        if let Some(name) = header {
            if problems.take(check_header_name(name, &format!("upstream.attribute_headers.{attribute}"))).is_some() {
                attribute_headers.push((attribute.clone(), name.to_ascii_lowercase()));
            }
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
            problems.push(ConfigError::duplicate(field, "credential.headers", message));
            continue;
        }
        if let Some((other, _)) = named.iter().find(|(_, n)| same_to_cgi(n, &name)) {
            let message = format!("{name:?} is already used by {other}");
            problems.push(ConfigError::duplicate(field, other.clone(), message));
            continue;
        }
        named.push((field, name));
    }
    Upstream {
        strip_credentials: raw.strip_credentials.unwrap_or(true),
        org_header,
        key_id_header,
        scopes_header,
        attribute_headers,
        identity_headers: named.into_iter().map(|(_, n)| n).collect(),
    }
}

/// The replies. A setting a kind inherits (`revoked_key` from `invalid_key`, every kind's body
/// from `errors.body`) is refused once, where it is written; a kind whose setting is refused has no
/// reply, and its problem is in `problems`.
pub(crate) fn compile_errors(raw: &RawErrors, credentials: &[CredentialHeader], problems: &mut Problems) -> Replies {
    let default_body = serde_json::json!({"error": "{code}", "message": "{message}"});
    let body = raw.body.as_ref().unwrap_or(&default_body);
    let mut body_refused = false;
    let mut specs: Vec<ReplySpec> = Vec::with_capacity(DenyKind::ALL.len());
    for kind in DenyKind::ALL {
        let field = format!("errors.{}", kind.name());
        // A revoked key answers exactly like an unknown one unless configured otherwise.
        let inherited = (kind == DenyKind::RevokedKey).then(|| raw.kind(DenyKind::InvalidKey)).flatten();
        let own = raw.kind(kind);
        let status = pick(own, inherited, |d| d.status.as_ref());
        if let Some((status, Own)) = status {
            if !(400..=599).contains(status) {
                problems.push(ConfigError::new(format!("{field}.status"), "must be between 400 and 599"));
            }
        }
        let status = status.map_or(kind.default_status(), |(&status, _)| status);
        let code: String = pick(own, inherited, |d| d.code.as_ref())
            .map_or_else(|| kind.default_code().to_string(), |(code, _)| code.clone());
        let message = match pick(own, inherited, |d| d.message.as_ref()) {
            // Refused already, where it is written.
            Some((text, Inherited)) => Template::parse(text, false).ok(),
            Some((text, Own)) => {
                problems.take(Template::parse(text, false).map_err(|m| ConfigError::new(format!("{field}.message"), m)))
            }
            None => problems.take(
                Template::parse(&kind.default_message(credentials), false)
                    .map_err(|m| ConfigError::new(format!("{field}.message"), m)),
            ),
        };
        let body = match pick(own, inherited, |d| d.body.as_ref()) {
            Some((v, Inherited)) => BodyTemplate::compile(v).ok(),
            Some((v, Own)) => {
                problems.take(BodyTemplate::compile(v).map_err(|m| ConfigError::new(format!("{field}.body"), m)))
            }
            None => match BodyTemplate::compile(body) {
                Ok(b) => Some(b),
                Err(m) => {
                    if !body_refused {
                        body_refused = true;
                        problems.push(ConfigError::new("errors.body", m));
                    }
                    None
                }
            },
        };
        if let (Some(message), Some(body)) = (message, body) {
            specs.push(ReplySpec { status, code, message, body });
        }
    }
    Replies::new(specs)
}

/// Where a kind's setting comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Own,
    Inherited,
}
use Source::{Inherited, Own};

/// A field of a kind's own settings, else of the settings it inherits, and which it is.
fn pick<'a, T>(
    own: Option<&'a RawDeny>,
    inherited: Option<&'a RawDeny>,
    field: impl Fn(&'a RawDeny) -> Option<&'a T>,
) -> Option<(&'a T, Source)> {
    own.and_then(&field).map(|v| (v, Own)).or_else(|| inherited.and_then(&field).map(|v| (v, Inherited)))
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
