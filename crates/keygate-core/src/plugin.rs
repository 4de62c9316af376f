//! The compiled plugin: what one keygate configuration becomes. [`Policy`] decides requests; the
//! `key_set` settings tell a host where a live key set comes from, the `usage` settings where usage
//! reports go.

use crate::checks::check_scope;
use crate::config::{
    check_no_route_shadowed, compile_credential_headers, compile_errors, compile_format, compile_route,
    compile_upstream, RawConfig, Unmatched,
};
use crate::error::{ConfigErrors, Problems};
use crate::json::parse_json;
use crate::keys::record::InlineKeys;
use crate::live::KeySetConfig;
use crate::policy::{Policy, Route};
use crate::scopes::ScopeRules;
use crate::usage::UsageConfig;

/// One compiled configuration.
#[derive(Debug)]
pub struct Plugin {
    pub policy: Policy,
    /// Where a live key set comes from, if one is configured.
    pub key_set: Option<KeySetConfig>,
    /// Where usage reports go, if usage is reported.
    pub usage: Option<UsageConfig>,
}

impl Plugin {
    /// Parses and compiles a plugin configuration (JSON text). Reading stops at the first problem
    /// of the text; compiling what was read reports every problem it finds.
    pub fn from_json(text: &[u8]) -> Result<Plugin, ConfigErrors> {
        Plugin::compile(parse_json::<RawConfig>(text)?)
    }

    /// Compiles a parsed configuration; every problem found, in the order of the steps: the key
    /// records' (met while they were read), then the credential, routes, scope implications,
    /// upstream headers, replies, key set and usage.
    pub fn compile(raw: RawConfig) -> Result<Plugin, ConfigErrors> {
        let mut problems = Problems::default();
        let InlineKeys { set: keys, problems: in_keys } = raw.keys;
        problems.append(in_keys);
        let credential_headers = compile_credential_headers(raw.credential.headers.as_deref(), &mut problems);
        let format = compile_format(&raw.credential, &mut problems);
        let routes: Vec<(usize, Route)> = raw
            .routes
            .iter()
            .enumerate()
            .filter_map(|(i, r)| compile_route(r, &format!("routes[{i}]"), &mut problems).map(|route| (i, route)))
            .collect();
        check_no_route_shadowed(&routes, &mut problems);
        for (scope, implied) in &raw.scope_implies {
            problems.take(check_scope(scope, &format!("scope_implies.{scope}")));
            for (i, s) in implied.iter().enumerate() {
                problems.take(check_scope(s, &format!("scope_implies.{scope}[{i}]")));
            }
        }
        let upstream = compile_upstream(&raw.upstream, &credential_headers, &mut problems);
        let replies = compile_errors(&raw.errors, &credential_headers, &mut problems);
        let key_set = raw.key_set.as_ref().and_then(|k| problems.take(KeySetConfig::compile(k)));
        let usage = raw.usage.as_ref().and_then(|u| problems.take(UsageConfig::compile(u)));
        problems.finish(|| {
            let routes: Vec<Route> = routes.into_iter().map(|(_, r)| r).collect();
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
            Plugin { policy, key_set, usage }
        })
    }
}
