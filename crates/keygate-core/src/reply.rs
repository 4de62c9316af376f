//! Deny kinds and the replies keygate sends for them: status, JSON body from a template, headers.

use crate::credential::CredentialHeader;
use serde_json::Value;

/// Why a request is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DenyKind {
    MissingKey,
    InvalidKey,
    RevokedKey,
    ExpiredKey,
    InsufficientScope,
    Forbidden,
    KeySetUnavailable,
}

impl DenyKind {
    pub const ALL: [DenyKind; 7] = [
        DenyKind::MissingKey,
        DenyKind::InvalidKey,
        DenyKind::RevokedKey,
        DenyKind::ExpiredKey,
        DenyKind::InsufficientScope,
        DenyKind::Forbidden,
        DenyKind::KeySetUnavailable,
    ];

    /// The configuration name of the kind (`errors.<name>`), also its stat name.
    pub fn name(self) -> &'static str {
        match self {
            DenyKind::MissingKey => "missing_key",
            DenyKind::InvalidKey => "invalid_key",
            DenyKind::RevokedKey => "revoked_key",
            DenyKind::ExpiredKey => "expired_key",
            DenyKind::InsufficientScope => "insufficient_scope",
            DenyKind::Forbidden => "forbidden",
            DenyKind::KeySetUnavailable => "key_set_unavailable",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// The reply's `code` unless `errors.<kind>.code` says otherwise.
    pub fn default_code(self) -> &'static str {
        match self {
            DenyKind::MissingKey => "missing_api_key",
            DenyKind::InvalidKey | DenyKind::RevokedKey => "invalid_api_key",
            DenyKind::ExpiredKey => "expired_api_key",
            DenyKind::InsufficientScope => "insufficient_scope",
            DenyKind::Forbidden => "forbidden",
            DenyKind::KeySetUnavailable => "key_set_unavailable",
        }
    }

    /// The reply's status unless `errors.<kind>.status` says otherwise.
    pub fn default_status(self) -> u16 {
        match self {
            DenyKind::MissingKey | DenyKind::InvalidKey | DenyKind::RevokedKey | DenyKind::ExpiredKey => 401,
            DenyKind::InsufficientScope | DenyKind::Forbidden => 403,
            DenyKind::KeySetUnavailable => 503,
        }
    }

    /// The reply's message unless `errors.<kind>.message` says otherwise; a missing key's names the
    /// configured credential headers.
    pub fn default_message(self, credentials: &[CredentialHeader]) -> String {
        match self {
            DenyKind::MissingKey => {
                let how: Vec<String> = credentials
                    .iter()
                    .map(|h| {
                        if h.bearer {
                            "Authorization: Bearer <key>".to_string()
                        } else {
                            format!("{}: <key>", h.name)
                        }
                    })
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

    /// The RFC 6750 `error` parameter of `WWW-Authenticate`, where one applies.
    fn bearer_error(self) -> Option<&'static str> {
        match self {
            DenyKind::InvalidKey | DenyKind::RevokedKey | DenyKind::ExpiredKey => Some("invalid_token"),
            DenyKind::InsufficientScope => Some("insufficient_scope"),
            DenyKind::MissingKey | DenyKind::Forbidden | DenyKind::KeySetUnavailable => None,
        }
    }
}

/// A placeholder inside a template string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    Code,
    Message,
    Status,
    MissingScopes,
    RequestId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    Var(Var),
}

/// A string with `{placeholders}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Piece>);

impl Template {
    /// Parses `text`; `{message}` is refused when `allow_message` is false (a message cannot quote
    /// itself).
    pub fn parse(text: &str, allow_message: bool) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            let (before, after) = rest.split_at(open);
            if !before.is_empty() {
                pieces.push(Piece::Text(before.to_string()));
            }
            let close = after.find('}').ok_or_else(|| format!("unclosed '{{' in template {text:?}"))?;
            let name = after.get(1..close).unwrap_or_default();
            let var = match name {
                "code" => Var::Code,
                "message" if allow_message => Var::Message,
                "status" => Var::Status,
                "missing_scopes" => Var::MissingScopes,
                "request_id" => Var::RequestId,
                _ => {
                    let known = if allow_message {
                        "{code}, {message}, {status}, {missing_scopes}, {request_id}"
                    } else {
                        "{code}, {status}, {missing_scopes}, {request_id}"
                    };
                    return Err(format!("unknown placeholder {{{name}}} in {text:?}; known: {known}"));
                }
            };
            pieces.push(Piece::Var(var));
            rest = after.get(close + 1..).unwrap_or_default();
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        Ok(Template(pieces))
    }

    fn is_exactly(&self, var: Var) -> bool {
        matches!(self.0.as_slice(), [Piece::Var(v)] if *v == var)
    }

    fn render(&self, ctx: &Context<'_>, out: &mut String) {
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Var(v) => ctx.push(*v, out),
            }
        }
    }
}

/// A JSON body template, compiled: literal JSON text between rendered strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyTemplate(Vec<BodyPiece>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyPiece {
    Json(String),
    /// A JSON string whose content is a rendered template.
    Str(Template),
    /// A string that was exactly `"{missing_scopes}"`: a JSON array of the missing scopes.
    MissingArray,
}

impl BodyTemplate {
    pub fn compile(value: &Value) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut json = String::new();
        compile_value(value, &mut pieces, &mut json)?;
        if !json.is_empty() {
            pieces.push(BodyPiece::Json(json));
        }
        Ok(BodyTemplate(pieces))
    }

    fn render(&self, ctx: &Context<'_>) -> String {
        let mut out = String::with_capacity(128);
        let mut scratch = String::new();
        for piece in &self.0 {
            match piece {
                BodyPiece::Json(j) => out.push_str(j),
                BodyPiece::Str(t) => {
                    scratch.clear();
                    t.render(ctx, &mut scratch);
                    push_json_string(&scratch, &mut out);
                }
                BodyPiece::MissingArray => {
                    out.push('[');
                    for (i, s) in ctx.missing.iter().enumerate() {
                        if i > 0 {
                            out.push(',');
                        }
                        push_json_string(s, &mut out);
                    }
                    out.push(']');
                }
            }
        }
        out
    }
}

fn compile_value(value: &Value, pieces: &mut Vec<BodyPiece>, json: &mut String) -> Result<(), String> {
    let flush = |pieces: &mut Vec<BodyPiece>, json: &mut String, piece: BodyPiece| {
        if !json.is_empty() {
            pieces.push(BodyPiece::Json(std::mem::take(json)));
        }
        pieces.push(piece);
    };
    match value {
        Value::String(s) => {
            let t = Template::parse(s, true)?;
            if t.is_exactly(Var::MissingScopes) {
                flush(pieces, json, BodyPiece::MissingArray);
            } else {
                match t.0.as_slice() {
                    [] => push_json_string("", json),
                    [Piece::Text(text)] => push_json_string(text, json),
                    _ => flush(pieces, json, BodyPiece::Str(t)),
                }
            }
        }
        Value::Array(items) => {
            json.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    json.push(',');
                }
                compile_value(item, pieces, json)?;
            }
            json.push(']');
        }
        Value::Object(map) => {
            json.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if k.contains(['{', '}']) {
                    return Err(format!(
                        "object key {k:?}: keys are sent as written; placeholders are replaced in string values only"
                    ));
                }
                if i > 0 {
                    json.push(',');
                }
                push_json_string(k, json);
                json.push(':');
                compile_value(v, pieces, json)?;
            }
            json.push('}');
        }
        Value::Number(n) => json.push_str(&n.to_string()),
        Value::Bool(b) => json.push_str(if *b { "true" } else { "false" }),
        Value::Null => json.push_str("null"),
    }
    Ok(())
}

fn push_json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// What placeholders are replaced with for one reply.
struct Context<'a> {
    code: &'a str,
    status: u16,
    message: &'a str,
    missing: &'a [&'a str],
    request_id: &'a str,
}

impl Context<'_> {
    fn push(&self, var: Var, out: &mut String) {
        match var {
            Var::Code => out.push_str(self.code),
            Var::Message => out.push_str(self.message),
            Var::Status => out.push_str(&self.status.to_string()),
            Var::MissingScopes => {
                for (i, s) in self.missing.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    out.push_str(s);
                }
            }
            Var::RequestId => out.push_str(self.request_id),
        }
    }
}

/// The compiled reply of one deny kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplySpec {
    pub status: u16,
    pub code: String,
    pub message: Template,
    pub body: BodyTemplate,
}

/// The body of the `500` a host sends when it cannot do keygate's job (a header unreadable, an edit
/// refused): the request fails closed. `reason` is one of the hosts' fixed texts, never request data.
pub fn internal_error_body(reason: &str) -> String {
    format!("{{\"error\":\"internal_error\",\"message\":\"{reason}\"}}")
}

/// A reply ready to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

/// The replies of every deny kind.
#[derive(Debug, Clone)]
pub struct Replies {
    specs: Vec<ReplySpec>,
}

impl Replies {
    /// `specs` in `DenyKind::ALL` order.
    pub fn new(specs: Vec<ReplySpec>) -> Self {
        Replies { specs }
    }

    pub fn spec(&self, kind: DenyKind) -> Option<&ReplySpec> {
        self.specs.get(kind.index())
    }

    /// Renders the reply for `kind`. `missing` lists the scopes a key lacked; `request_id` is the
    /// request's `x-request-id` (empty if none).
    pub fn render(&self, kind: DenyKind, missing: &[&str], request_id: &str) -> Reply {
        let Some(spec) = self.spec(kind) else {
            return Reply {
                status: 500,
                headers: vec![("content-type", "application/json".into())],
                body: "{}".into(),
            };
        };
        let mut ctx = Context { code: &spec.code, status: spec.status, message: "", missing, request_id };
        let mut message = String::new();
        spec.message.render(&ctx, &mut message);
        ctx.message = &message;
        let body = spec.body.render(&ctx);
        let mut challenge = String::from("Bearer realm=\"api\"");
        if let Some(error) = kind.bearer_error() {
            challenge.push_str(", error=\"");
            challenge.push_str(error);
            challenge.push('"');
        }
        if kind == DenyKind::InsufficientScope && !missing.is_empty() {
            challenge.push_str(", scope=\"");
            challenge.push_str(&missing.join(" "));
            challenge.push('"');
        }
        Reply {
            status: spec.status,
            headers: vec![("content-type", "application/json".into()), ("www-authenticate", challenge)],
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn replies_with(body: Value, message: &str) -> Replies {
        let spec = ReplySpec {
            status: 403,
            code: "insufficient_scope".into(),
            message: Template::parse(message, false).unwrap(),
            body: BodyTemplate::compile(&body).unwrap(),
        };
        Replies::new(DenyKind::ALL.iter().map(|_| spec.clone()).collect())
    }

    #[test]
    fn placeholders_are_replaced_and_escaped() {
        let r = replies_with(
            json!({"error": "{code}", "message": "{message}", "status": "{status}", "req": "{request_id}", "n": 1}),
            "Missing scope: {missing_scopes}",
        );
        let reply = r.render(DenyKind::InsufficientScope, &["a:b", "c"], "rid-\"1\"");
        let parsed: Value = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(
            parsed,
            json!({"error": "insufficient_scope", "message": "Missing scope: a:b c", "status": "403",
                   "req": "rid-\"1\"", "n": 1})
        );
    }

    #[test]
    fn exact_missing_scopes_string_becomes_an_array() {
        let r = replies_with(json!({"error": "{message}", "missing": "{missing_scopes}"}), "Insufficient scope");
        let reply = r.render(DenyKind::InsufficientScope, &["bookings:read"], "");
        assert_eq!(reply.body, r#"{"error":"Insufficient scope","missing":["bookings:read"]}"#);
        let nested = replies_with(json!({"error": {"missing": ["{missing_scopes}"]}}), "m");
        let reply = nested.render(DenyKind::InsufficientScope, &[], "");
        assert_eq!(reply.body, r#"{"error":{"missing":[[]]}}"#);
    }

    #[test]
    fn www_authenticate_carries_the_rfc6750_error() {
        let r = replies_with(json!({}), "m");
        let header = |kind, missing: &[&str]| {
            r.render(kind, missing, "").headers.into_iter().find(|(n, _)| *n == "www-authenticate").map(|(_, v)| v)
        };
        assert_eq!(header(DenyKind::MissingKey, &[]).as_deref(), Some("Bearer realm=\"api\""));
        assert_eq!(header(DenyKind::ExpiredKey, &[]).as_deref(), Some("Bearer realm=\"api\", error=\"invalid_token\""));
        assert_eq!(
            header(DenyKind::InsufficientScope, &["a", "b"]).as_deref(),
            Some("Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"a b\"")
        );
    }

    #[test]
    fn bad_templates_are_rejected() {
        assert!(Template::parse("{nope}", true).is_err());
        assert!(Template::parse("open {code", true).is_err());
        assert!(Template::parse("{message}", false).is_err());
        assert!(BodyTemplate::compile(&json!({"a": ["{unknown}"]})).is_err());
        assert!(Template::parse("braces } alone are text", true).is_ok());
    }
}
