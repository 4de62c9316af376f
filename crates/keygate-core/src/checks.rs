//! Checks of configured text shared by every compile step: header names and values, scopes, and
//! which header names a server reads as one.

use crate::error::ConfigError;

/// True if a CGI-style server reads the two header names as one: equal ignoring case, with every
/// character other than a letter or digit taken as the same (`_` and `-` for most, `.` or `~` too for
/// lighttpd).
pub fn same_to_cgi(a: &str, b: &str) -> bool {
    let fold = |c: u8| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { b'-' };
    a.len() == b.len() && a.bytes().zip(b.bytes()).all(|(x, y)| fold(x) == fold(y))
}

pub(crate) fn check_header_name(name: &str, field: &str) -> Result<(), ConfigError> {
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

pub(crate) fn check_header_value(value: &str, field: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.chars().any(char::is_control) || value.trim() != value {
        return Err(ConfigError::new(field, "must be non-empty, without control characters or surrounding spaces"));
    }
    Ok(())
}

pub(crate) fn check_scope(scope: &str, field: &str) -> Result<(), ConfigError> {
    if scope.is_empty() || !scope.bytes().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::new(field, format!("{scope:?} is not a scope (visible ASCII, no spaces)")));
    }
    Ok(())
}
