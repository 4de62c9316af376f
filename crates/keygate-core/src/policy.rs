//! The compiled policy and the one decision: from (policy, key source, request) to allow or deny.

use crate::checks::same_to_cgi;
use crate::credential::{carries_credential, extract, Credential, CredentialHeader, KeyFormat};
use crate::keys::{hash_key, Key, KeyRef, KeySet, KeySource, Lookup};
use crate::reply::{DenyKind, Replies, Reply};
use crate::routes::{percent_decode, Case, PathPattern, PathViews, MAX_READ_PATH};
use crate::scopes::ScopeRules;
use std::borrow::Cow;

/// Everything the filter enforces, compiled from the plugin configuration.
#[derive(Debug)]
pub struct Policy {
    pub credential_headers: Vec<CredentialHeader>,
    pub format: KeyFormat,
    pub keys: KeySet,
    pub routes: Vec<Route>,
    /// Every route's literal segments are lower-case ASCII (see [`PathPattern::literals_are_lower_ascii`]).
    pub routes_lower_ascii: bool,
    pub deny_unmatched: bool,
    pub scopes: ScopeRules,
    pub upstream: Upstream,
    pub replies: Replies,
}

#[derive(Debug)]
pub struct Route {
    /// Upper-case methods; `None` matches any.
    pub methods: Option<Vec<String>>,
    pub pattern: PathPattern,
    pub scopes: Vec<String>,
    /// (capture name, key attribute name); the attribute `org` is the key's organisation.
    pub bind: Vec<(String, String)>,
    pub public: bool,
}

/// What the upstream is told, and what it is never shown.
#[derive(Debug)]
pub struct Upstream {
    pub strip_credentials: bool,
    pub org_header: Option<String>,
    pub key_id_header: Option<String>,
    pub scopes_header: Option<String>,
    /// (key attribute, header name).
    pub attribute_headers: Vec<(String, String)>,
    /// Every identity header keygate sets: incoming copies of these are always removed.
    pub identity_headers: Vec<String>,
}

/// What one request looks like to the decision: its method, path and headers as received.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a [u8],
    pub path: &'a [u8],
    /// Header names in lower case, as Envoy hands them over; repeated headers repeated.
    pub headers: &'a [(String, Vec<u8>)],
}

impl<'a> RequestView<'a> {
    /// Builds the view from Envoy's header list (`:method` and `:path` among them).
    pub fn from_headers(headers: &'a [(String, Vec<u8>)]) -> Self {
        let pseudo =
            |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_slice()).unwrap_or_default();
        RequestView { method: pseudo(":method"), path: pseudo(":path"), headers }
    }

    pub fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

/// The header edits an allowed request gets before it goes upstream.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeaderEdits<'p> {
    /// Headers to remove, every copy: configured names, or a spelling the request used.
    pub remove: Vec<Cow<'p, str>>,
    /// Headers to set to exactly one value.
    pub set: Vec<(&'p str, String)>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision<'p> {
    Allow {
        edits: HeaderEdits<'p>,
        /// The record id of the key used, if the route needed one.
        key_id: Option<String>,
    },
    Deny(Denial<'p>),
}

#[derive(Debug, PartialEq, Eq)]
pub struct Denial<'p> {
    pub kind: DenyKind,
    /// For `insufficient_scope`: the route's scopes that the key lacks.
    pub missing_scopes: Vec<&'p str>,
    /// The record id of the key, when one was found (for logs; never the key itself).
    pub key_id: Option<String>,
    /// Request headers to remove, every copy, before the reply is sent: every identity header the
    /// request carries, in any spelling keygate removes from an allowed request. Nothing goes
    /// upstream, but Envoy's access log reads the request's headers (`%REQ(X-API-KEY-ID)%`), and a
    /// refused request must not be logged under an identity its client made up.
    pub remove: Vec<Cow<'p, str>>,
}

impl<'p> Denial<'p> {
    fn new(kind: DenyKind) -> Self {
        Denial { kind, missing_scopes: Vec::new(), key_id: None, remove: Vec::new() }
    }

    /// The hosts' debug log line for this refusal: the kind and, when one was found, the key's
    /// record id (never the key).
    pub fn log_line(&self) -> String {
        match &self.key_id {
            Some(id) => format!("keygate: denied {} for key {id}", self.kind.name()),
            None => format!("keygate: denied {}", self.kind.name()),
        }
    }
}

/// Which rule a reading of the path falls under.
enum Rule<'p, 'r> {
    Public,
    Protected(&'p Route, crate::routes::Captures<'p, 'r>),
    Unmatched,
}

impl Policy {
    /// The reply to send for `denial`, echoing `request`'s `x-request-id` where a template asks
    /// for it.
    pub fn reply(&self, denial: &Denial<'_>, request: &RequestView<'_>) -> Reply {
        let request_id = request
            .headers
            .iter()
            .find(|(n, _)| n == "x-request-id")
            .map(|(_, v)| String::from_utf8_lossy(v))
            .unwrap_or_default();
        self.replies.render(denial.kind, &denial.missing_scopes, &request_id)
    }

    /// Decides one request. `keys` is where key records are looked up; `now_ms` gives the current
    /// time in Unix milliseconds and is only asked when a key has an expiry.
    pub fn decide<'p>(
        &'p self,
        keys: &dyn KeySource,
        request: &RequestView<'_>,
        now_ms: &dyn Fn() -> Option<i64>,
    ) -> Decision<'p> {
        let mut budget = MAX_READ_PATH;
        let path = PathViews::within(request.path, &mut budget);
        // IIS's URL Rewrite, Symfony and Zend route by these headers when a client sends them.
        let mut url_overrides: Vec<PathViews<'_>> = Vec::new();
        let mut method_overridden = false;
        // Every override header starts `x-`: one byte tells most headers apart.
        for (name, value) in
            request.headers.iter().filter(|(n, _)| n.as_bytes().first().is_some_and(|c| c | 0x20 == b'x'))
        {
            // Any spelling a CGI-style server reads as the header: Symfony reads `x_http_method_override`.
            if URL_OVERRIDE_HEADERS.iter().any(|h| same_to_cgi(name, h)) && url_overrides.len() <= MAX_URLS {
                url_overrides.push(PathViews::within(value, &mut budget));
            }
            method_overridden |= METHOD_OVERRIDE_HEADERS.iter().any(|h| same_to_cgi(name, h));
        }
        let query =
            request.path.iter().position(|&c| c == b'?').and_then(|at| request.path.get(at..)).unwrap_or_default();
        let plain_method = [Cow::Borrowed(request.method)];
        let other_methods;
        // A `_method` parameter may be spelled with escapes (`_%6Dethod`), hence any `%`.
        let methods: &[Cow<'_, [u8]>] = if method_overridden
            || request.method.iter().any(u8::is_ascii_lowercase)
            || request.method == b"HEAD"
            || query.contains(&b'%')
            || query.windows(6).any(|w| w.eq_ignore_ascii_case(b"method"))
        {
            other_methods = method_readings(request);
            &other_methods
        } else {
            &plain_method
        };
        if methods.len() > MAX_METHODS
            || url_overrides.len() > MAX_URLS
            || path.too_long()
            || url_overrides.iter().any(PathViews::too_long)
        {
            // Only a hostile request names that many; refusing it bounds the work.
            return self.refuse(request, Denial::new(DenyKind::Forbidden));
        }
        let mut rules: Vec<Rule<'p, '_>> = Vec::new();
        for views in std::iter::once(&path).chain(&url_overrides) {
            // A case-insensitive router reads `/V1/venues` as `/v1/venues`; when neither the routes nor
            // the path have a letter whose case could matter, that reading is the exact one.
            let folded = !(self.routes_lower_ascii && views.all_lower_ascii());
            for method in methods {
                for segments in views.all() {
                    rules.push(self.rule_for(method, segments, Case::Exact));
                    if folded {
                        rules.push(self.rule_for(method, segments, Case::Folded));
                    }
                }
            }
        }

        if rules.iter().all(|r| matches!(r, Rule::Public)) {
            return Decision::Allow { edits: self.edits(request, None), key_id: None };
        }

        let key = match self.authenticate(keys, request, now_ms) {
            Ok(key) => key,
            Err(denial) => return self.refuse(request, denial),
        };

        for rule in &rules {
            if let Err(mut denial) = self.authorize(rule, &key) {
                denial.key_id = Some(key.id.clone());
                return self.refuse(request, denial);
            }
        }
        Decision::Allow { edits: self.edits(request, Some(&key)), key_id: Some(key.id.clone()) }
    }

    /// The refusal of `request`, with the identity headers it carries to remove ([`Denial::remove`]).
    fn refuse<'p>(&'p self, request: &RequestView<'_>, mut denial: Denial<'p>) -> Decision<'p> {
        self.remove_spoofed(request, &[], false, &mut denial.remove);
        Decision::Deny(denial)
    }

    /// The trailers to remove from a request before it goes upstream, named as the trailers
    /// spell them, each once: every trailer that is, in any case or spelling a CGI-style server
    /// reads as it (`x_org_id`, `X.Org.Id`), a header keygate reads or sets on the request. That
    /// is a credential header, whatever its value and whatever `strip_credentials` says (keygate
    /// never checked it); an identity header; and a method- or URL-override header. keygate
    /// decides on the headers alone, so an upstream that merges trailers into them must find
    /// there nothing keygate did not check or set. Every other trailer goes through.
    pub fn trailers_to_remove<'t>(&self, trailers: &'t [(String, Vec<u8>)]) -> Vec<&'t str> {
        let mut remove: Vec<&'t str> = Vec::new();
        for (name, _) in trailers {
            if self.reads_or_sets(name) && !remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                remove.push(name);
            }
        }
        remove
    }

    /// True if a header of this name (in any CGI spelling) is one keygate reads or sets on a
    /// request: a credential, identity or override header.
    fn reads_or_sets(&self, name: &str) -> bool {
        let twin = |managed: &str| same_to_cgi(name, managed);
        self.credential_headers.iter().any(|h| twin(&h.name))
            || self.upstream.identity_headers.iter().any(|h| twin(h))
            || URL_OVERRIDE_HEADERS.iter().any(|h| twin(h))
            || METHOD_OVERRIDE_HEADERS.iter().any(|h| twin(h))
    }

    fn rule_for<'p, 'r>(&'p self, method: &[u8], segments: &'r [Cow<'r, [u8]>], case: Case) -> Rule<'p, 'r> {
        for route in &self.routes {
            let method_ok = route.methods.as_ref().is_none_or(|ms| ms.iter().any(|m| m.as_bytes() == method));
            if !method_ok {
                continue;
            }
            if let Some(captures) = route.pattern.matches(segments, case) {
                return if route.public { Rule::Public } else { Rule::Protected(route, captures) };
            }
        }
        Rule::Unmatched
    }

    /// Finds and checks the key: present, well-formed, known, not revoked, not expired.
    fn authenticate<'p, 'k>(
        &'p self,
        keys: &'k dyn KeySource,
        request: &RequestView<'_>,
        now_ms: &dyn Fn() -> Option<i64>,
    ) -> Result<KeyRef<'k>, Denial<'p>> {
        let presented = match extract(&self.credential_headers, request.headers) {
            Credential::Missing => return Err(Denial::new(DenyKind::MissingKey)),
            Credential::Malformed => return Err(Denial::new(DenyKind::InvalidKey)),
            Credential::Key(key, _) => key,
        };
        if !self.format.accepts(presented) {
            return Err(Denial::new(DenyKind::InvalidKey));
        }
        let key = match keys.lookup(&hash_key(presented)) {
            Lookup::Found(key) => key,
            Lookup::NotFound => return Err(Denial::new(DenyKind::InvalidKey)),
            Lookup::Unavailable => return Err(Denial::new(DenyKind::KeySetUnavailable)),
        };
        let with_id = |kind| Denial { key_id: Some(key.id.clone()), ..Denial::new(kind) };
        if key.revoked {
            return Err(with_id(DenyKind::RevokedKey));
        }
        if key.expires_at_ms.is_some() && now_ms().is_none_or(|now| key.expired_at(now)) {
            return Err(with_id(DenyKind::ExpiredKey));
        }
        Ok(key)
    }

    /// Checks one reading's rule against an authenticated key: scopes, then tenant binding.
    fn authorize<'p>(&'p self, rule: &Rule<'p, '_>, key: &Key) -> Result<(), Denial<'p>> {
        let (route, captures) = match rule {
            Rule::Public => return Ok(()),
            Rule::Unmatched if self.deny_unmatched => return Err(Denial::new(DenyKind::Forbidden)),
            Rule::Unmatched => return Ok(()),
            Rule::Protected(route, captures) => (route, captures),
        };
        let missing = self.scopes.missing(&key.scopes, &route.scopes);
        if !missing.is_empty() {
            return Err(Denial { missing_scopes: missing, ..Denial::new(DenyKind::InsufficientScope) });
        }
        for (capture, attribute) in &route.bind {
            let expected = if attribute == "org" { Some(key.org.as_str()) } else { key.attribute(attribute) };
            let Some(expected) = expected else { continue };
            let actual = captures.iter().find(|(name, _)| name == capture).map(|(_, v)| *v);
            if actual != Some(expected.as_bytes()) {
                return Err(Denial::new(DenyKind::Forbidden));
            }
        }
        Ok(())
    }

    /// The edits for an allowed request: drop credentials (when configured) and every incoming copy
    /// of an identity header, then set the identity of `key`.
    fn edits<'p>(&'p self, request: &RequestView<'_>, key: Option<&Key>) -> HeaderEdits<'p> {
        let up = &self.upstream;
        let mut set: Vec<(&'p str, String)> = Vec::new();
        if let Some(key) = key {
            if let Some(h) = &up.org_header {
                set.push((h, key.org.clone()));
            }
            if let Some(h) = &up.key_id_header {
                set.push((h, key.id.clone()));
            }
            if let Some(h) = &up.scopes_header {
                set.push((h, key.scopes.join(" ")));
            }
            for (attribute, h) in &up.attribute_headers {
                if let Some(v) = key.attribute(attribute) {
                    set.push((h, v.to_string()));
                }
            }
        }
        let mut remove: Vec<Cow<'p, str>> = Vec::new();
        if up.strip_credentials {
            for header in &self.credential_headers {
                // Also a key under another scheme (`Token sk_live_…`, or Basic), which some upstream may accept.
                let carried = request.headers.iter().any(|(n, v)| {
                    n.eq_ignore_ascii_case(&header.name)
                        && (carries_credential(header, v)
                            || self.format.has_prefix_within(v)
                            || (header.bearer && self.format.has_prefix_within_basic(v)))
                });
                if carried {
                    remove.push(Cow::Borrowed(&header.name));
                }
            }
        }
        self.remove_spoofed(request, &set, true, &mut remove);
        HeaderEdits { remove, set }
    }

    /// Adds to `remove` what of `request` claims an identity keygate did not give: every identity
    /// header it carries that `set` does not replace, and every other spelling of one; with
    /// `credentials`, also every other spelling of a credential header.
    fn remove_spoofed<'p>(
        &'p self,
        request: &RequestView<'_>,
        set: &[(&'p str, String)],
        credentials: bool,
        remove: &mut Vec<Cow<'p, str>>,
    ) {
        let up = &self.upstream;
        for name in &up.identity_headers {
            // Setting a header replaces every copy; only spoofed headers that are not set need removing.
            if request.has_header(name) && !set.iter().any(|(s, _)| s == name) {
                remove.push(Cow::Borrowed(name));
            }
        }
        // CGI, WSGI and Rack read `x_org_id` as `x-org-id` (both are HTTP_X_ORG_ID), and lighttpd maps
        // every character that is not a letter or digit to `_` (`x.org.id` too): such a spelling of an
        // identity or credential header is never what keygate set or checked.
        let odd = |n: &str| !n.starts_with(':') && n.bytes().any(|c| c != b'-' && !c.is_ascii_alphanumeric());
        for (name, _) in request.headers.iter().filter(|(n, _)| odd(n)) {
            let twin = |managed: &str| same_to_cgi(name, managed);
            let managed = up.identity_headers.iter().any(|h| twin(h))
                || (credentials && self.credential_headers.iter().any(|h| twin(&h.name)));
            if managed && !remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                remove.push(Cow::Owned(name.clone()));
            }
        }
    }
}

/// Most methods (as sent, upper-cased, overrides) and URL-override headers one request may be read
/// by; a request that names more is refused as `forbidden`.
const MAX_METHODS: usize = 8;
const MAX_URLS: usize = 3;

/// Headers through which a server lets a client choose the path its router sees.
const URL_OVERRIDE_HEADERS: [&str; 2] = ["x-original-url", "x-rewrite-url"];

/// Headers through which a framework lets a client choose the method its router sees (Express's
/// `method-override`, Symfony, Laravel, Google's APIs).
const METHOD_OVERRIDE_HEADERS: [&str; 3] = ["x-http-method-override", "x-http-method", "x-method-override"];

/// The methods a request may mean, without repeats: as sent; upper-cased (Werkzeug and Django
/// upper-case it; Go's router and Envoy's route matching do not); any method a method-override
/// header or a `_method` query parameter names (Symfony and Laravel read it from the query too); and
/// GET for HEAD, which servers answer with their GET handler.
fn method_readings<'a>(request: &RequestView<'a>) -> Vec<Cow<'a, [u8]>> {
    let mut out = vec![Cow::Borrowed(request.method)];
    let mut add = |method: Cow<'a, [u8]>| {
        // One past the limit is enough for the caller to refuse, and keeps this loop short.
        if out.len() <= MAX_METHODS && !method.is_empty() && !out.contains(&method) {
            out.push(method);
        }
    };
    if request.method.iter().any(u8::is_ascii_lowercase) {
        add(Cow::Owned(request.method.to_ascii_uppercase()));
    }
    for (name, value) in request.headers {
        if METHOD_OVERRIDE_HEADERS.iter().any(|h| same_to_cgi(name, h)) {
            for element in value.split(|&c| c == b',') {
                add(Cow::Owned(element.trim_ascii().to_ascii_uppercase()));
            }
        }
    }
    if let Some(query) = request.path.iter().position(|&c| c == b'?').and_then(|at| request.path.get(at + 1..)) {
        for pair in query.split(|&c| c == b'&' || c == b';') {
            let (name, value) = pair.split_at(pair.iter().position(|&c| c == b'=').unwrap_or(pair.len()));
            if php_name(name).eq_ignore_ascii_case(b"_method") {
                let value = percent_decode(value.get(1..).unwrap_or_default());
                add(Cow::Owned(value.trim_ascii().to_ascii_uppercase()));
            }
        }
    }
    let get: &[u8] = b"GET";
    if out.iter().any(|m| m.as_ref() == b"HEAD") && !out.iter().any(|m| m.as_ref() == get) && out.len() <= MAX_METHODS {
        out.push(Cow::Borrowed(get));
    }
    out
}

/// A query parameter's name as PHP registers it (Symfony and Laravel read `_method` from `$_GET`):
/// `+` is a space, escapes decoded, leading spaces dropped, and a space or `.` is `_`, so
/// `.method` and `+_method` are `_method`.
fn php_name(name: &[u8]) -> Vec<u8> {
    let spaced: Vec<u8> = name.iter().map(|&c| if c == b'+' { b' ' } else { c }).collect();
    let decoded = percent_decode(&spaced);
    let start = decoded.iter().position(|&c| c != b' ').unwrap_or(decoded.len());
    decoded.get(start..).unwrap_or_default().iter().map(|&c| if c == b' ' || c == b'.' { b'_' } else { c }).collect()
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "policy_props.rs"]
mod props;
