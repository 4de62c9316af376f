//! The compiled plugin: what one keygate configuration becomes. [`Policy`] decides requests; the
//! `key_set` settings tell a host where a live key set comes from.

use crate::checks::check_scope;
use crate::config::{
    check_no_route_shadowed, compile_credential_headers, compile_errors, compile_format, compile_route,
    compile_upstream, RawConfig, Unmatched,
};
use crate::error::ConfigError;
use crate::json::parse_json;
use crate::live::KeySetConfig;
use crate::policy::Policy;
use crate::scopes::ScopeRules;

/// One compiled configuration.
#[derive(Debug)]
pub struct Plugin {
    pub policy: Policy,
    /// Where a live key set comes from, if one is configured.
    pub key_set: Option<KeySetConfig>,
}

impl Plugin {
    /// Parses and compiles a plugin configuration (JSON text).
    pub fn from_json(text: &[u8]) -> Result<Plugin, ConfigError> {
        Plugin::compile(parse_json::<RawConfig>(text)?)
    }

    /// Compiles a parsed configuration.
    pub fn compile(raw: RawConfig) -> Result<Plugin, ConfigError> {
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
        let policy = Policy {
            credential_headers,
            format,
            keys,
            routes_lower_ascii: routes.iter().all(|r| r.pattern.literals_are_lower_ascii()),
            routes,
            deny_unmatched: raw.unmatched == Unmatched::Deny,
            scopes: ScopeRules::new(&raw.scope_implies),
            upstream,
            replies,
        };
        Ok(Plugin { policy, key_set })
    }
}
