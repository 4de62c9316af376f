//! Finding the API key in a request's headers, and checking its shape before it is hashed.

/// How one configured credential header carries a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialHeader {
    /// Lower-case header name.
    pub name: String,
    /// `authorization`: the Bearer scheme. Any other header: the bare key.
    pub bearer: bool,
}

impl CredentialHeader {
    pub fn new(name: &str) -> Self {
        let name = name.to_ascii_lowercase();
        let bearer = name == "authorization";
        CredentialHeader { name, bearer }
    }

    /// The credential one value of this header carries, if any. `Some(b"")` is never returned.
    fn credential<'v>(&self, value: &'v [u8]) -> Option<Carried<'v>> {
        let value = trim(value);
        if !self.bearer {
            return (!value.is_empty()).then_some(Carried::Key(value));
        }
        if value.contains(&b',') {
            // Envoy joins repeated headers with a comma (`Basic eA==, Bearer <key>`), and so may a
            // client: a list with a Bearer credential in it is a credential, but never a usable one.
            let bearer = value.split(|&c| c == b',').any(|element| matches!(bearer(element), Some(Carried::Key(_))));
            return bearer.then_some(Carried::Malformed);
        }
        bearer(value)
    }
}

/// The Bearer credential of one `Authorization` value (RFC 6750 section 2.1).
fn bearer(value: &[u8]) -> Option<Carried<'_>> {
    let value = trim(value);
    // The scheme is a token; whatever ends it (a space, a tab, a byte such as 0xA0 that Python's
    // `str.split` takes for a space) ends `Bearer` too.
    let scheme_end = value.iter().position(|&c| !is_token_char(c)).unwrap_or(value.len());
    let (scheme, rest) = value.split_at(scheme_end);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None; // Basic, Digest…: not a keygate credential, left alone.
    }
    if rest.is_empty() {
        return None; // `Bearer` and nothing: no key was sent.
    }
    let key = trim_start_spaces(rest);
    if rest.first() != Some(&b' ') || key.is_empty() {
        return Some(Carried::Malformed); // a tab or another separator, or spaces and nothing
    }
    Some(Carried::Key(key))
}

/// A `tchar` of RFC 9110 section 5.6.2.
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

enum Carried<'v> {
    Key(&'v [u8]),
    Malformed,
}

/// What the configured headers of a request carry.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential<'a> {
    /// No configured header carries a key.
    Missing,
    /// The deciding header carries something that cannot be a key (two keys, a bad separator).
    Malformed,
    /// One key, from the header at this index of the configured list.
    Key(&'a [u8], usize),
}

/// Checks of a key's shape, done before hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    /// Allowed prefixes; empty means any.
    pub prefixes: Vec<String>,
    pub max_length: usize,
}

impl KeyFormat {
    /// True if the key could be one keygate issues: short enough, visible ASCII only (no space, no
    /// comma, which would make it two values), and with an allowed prefix.
    pub fn accepts(&self, key: &[u8]) -> bool {
        key.len() <= self.max_length
            && key.iter().all(|&c| c.is_ascii_graphic() && c != b',')
            && (self.prefixes.is_empty() || self.prefixes.iter().any(|p| key.starts_with(p.as_bytes())))
    }
}

impl KeyFormat {
    /// True if one of the configured prefixes appears anywhere in `value`.
    pub fn has_prefix_within(&self, value: &[u8]) -> bool {
        self.prefixes.iter().any(|p| !p.is_empty() && value.windows(p.len()).any(|w| w == p.as_bytes()))
    }

    /// True if a Basic credential in this `Authorization` value (or in any comma-separated element of
    /// it) holds one of the configured prefixes once decoded: APIs in Stripe's style take a key as the
    /// Basic user name (`-u sk_live_…:`), so an upstream may accept one that keygate never checked.
    pub fn has_prefix_within_basic(&self, value: &[u8]) -> bool {
        value.split(|&c| c == b',').any(|element| {
            let element = trim(element);
            let scheme_end = element.iter().position(|&c| !is_token_char(c)).unwrap_or(element.len());
            let (scheme, rest) = element.split_at(scheme_end);
            scheme.eq_ignore_ascii_case(b"basic") && !rest.is_empty() && self.has_prefix_within(&base64_decode(rest))
        })
    }
}

/// Decodes base64 leniently, as Python's `b64decode` does: either alphabet, and any other byte
/// (padding, spaces) skipped.
fn base64_decode(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3 + 2);
    let (mut acc, mut bits) = (0u32, 0u32);
    for &c in text {
        let sextet = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => continue,
        };
        acc = (acc << 6 | u32::from(sextet)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from(acc >> bits & 0xff).unwrap_or_default());
        }
    }
    out
}

/// Finds the credential: the first configured header, in order, that carries one decides. A header
/// that carries two (repeated, or two values in one) is `Malformed`.
pub fn extract<'a>(configured: &[CredentialHeader], headers: &'a [(String, Vec<u8>)]) -> Credential<'a> {
    for (index, header) in configured.iter().enumerate() {
        let mut found: Option<&'a [u8]> = None;
        let mut count = 0usize;
        for (_, value) in headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(&header.name)) {
            match header.credential(value) {
                None => {}
                Some(Carried::Malformed) => return Credential::Malformed,
                Some(Carried::Key(key)) => {
                    count += 1;
                    found = Some(key);
                }
            }
        }
        match (count, found) {
            (0, _) => continue,
            (1, Some(key)) => return Credential::Key(key, index),
            _ => return Credential::Malformed,
        }
    }
    Credential::Missing
}

/// True if this header value carries a keygate credential (what stripping removes).
pub fn carries_credential(header: &CredentialHeader, value: &[u8]) -> bool {
    header.credential(value).is_some()
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&c| c != b' ' && c != b'\t').unwrap_or(v.len());
    let end = v.iter().rposition(|&c| c != b' ' && c != b'\t').map_or(start, |e| e + 1);
    v.get(start..end).unwrap_or_default()
}

fn trim_start_spaces(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|&c| c != b' ').unwrap_or(v.len());
    v.get(start..).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect()
    }

    fn configured(names: &[&str]) -> Vec<CredentialHeader> {
        names.iter().map(|n| CredentialHeader::new(n)).collect()
    }

    fn key_of(names: &[&str], pairs: &[(&str, &str)]) -> Result<(String, usize), String> {
        let h = hdrs(pairs);
        match extract(&configured(names), &h) {
            Credential::Key(k, i) => Ok((String::from_utf8_lossy(k).into_owned(), i)),
            other => Err(format!("{other:?}")),
        }
    }

    #[test]
    fn bearer_scheme_is_case_insensitive() {
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let got = key_of(&["authorization"], &[("authorization", &format!("{scheme} sk_live_a_b"))]);
            assert_eq!(got, Ok(("sk_live_a_b".into(), 0)));
        }
    }

    #[test]
    fn several_spaces_before_the_key_are_fine() {
        assert_eq!(key_of(&["authorization"], &[("authorization", "Bearer    k1")]), Ok(("k1".into(), 0)));
    }

    #[test]
    fn a_tab_or_another_separator_after_bearer_is_malformed() {
        for value in [&b"Bearer\tk1"[..], b"bearer\xa0k1", b"Bearer\x0bk1", b"Bearer/k1", b"Bearer:k1"] {
            let h = vec![("authorization".to_string(), value.to_vec())];
            assert_eq!(extract(&configured(&["authorization"]), &h), Credential::Malformed, "{value:?}");
        }
    }

    #[test]
    fn trailing_junk_stays_in_the_key_and_fails_its_format() {
        let (key, _) = key_of(&["authorization"], &[("authorization", "Bearer k1 junk")]).unwrap();
        assert_eq!(key, "k1 junk");
        let format = KeyFormat { prefixes: vec![], max_length: 256 };
        assert!(!format.accepts(key.as_bytes()));
    }

    #[test]
    fn bearer_with_nothing_is_no_credential() {
        let h = hdrs(&[("authorization", "Bearer")]);
        assert_eq!(extract(&configured(&["authorization"]), &h), Credential::Missing);
    }

    #[test]
    fn other_schemes_are_left_alone() {
        let h = hdrs(&[("authorization", "Basic dXNlcjpwYXNz")]);
        assert_eq!(extract(&configured(&["authorization"]), &h), Credential::Missing);
        let h = hdrs(&[("authorization", "Bearerish k1")]);
        assert_eq!(extract(&configured(&["authorization"]), &h), Credential::Missing);
    }

    #[test]
    fn repeated_header_is_malformed() {
        let h = hdrs(&[("authorization", "Bearer k1"), ("authorization", "Bearer k2")]);
        assert_eq!(extract(&configured(&["authorization"]), &h), Credential::Malformed);
        let h = hdrs(&[("x-api-key", "k1"), ("x-api-key", "k1")]);
        assert_eq!(extract(&configured(&["x-api-key"]), &h), Credential::Malformed);
    }

    #[test]
    fn a_joined_value_with_a_bearer_element_is_malformed_and_carried() {
        let auth = CredentialHeader::new("authorization");
        for joined in [
            "Bearer k1,Bearer k2",
            "Basic eA==, Bearer k1",
            "Basic eA==,bearer k1",
            "Bearer k1, Basic eA==",
            "x,Bearer  k1 ,",
        ] {
            let h = hdrs(&[("authorization", joined)]);
            assert_eq!(extract(std::slice::from_ref(&auth), &h), Credential::Malformed, "{joined}");
            assert!(carries_credential(&auth, joined.as_bytes()), "{joined} is stripped");
        }
        for other in ["Basic eA==, Digest x", "Basic eA==, Bearer", "Basic a,b"] {
            let h = hdrs(&[("authorization", other)]);
            assert_eq!(extract(std::slice::from_ref(&auth), &h), Credential::Missing, "{other}");
            assert!(!carries_credential(&auth, other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn first_configured_header_with_a_credential_decides() {
        let pairs = [("x-api-key", "k2"), ("authorization", "Bearer k1")];
        assert_eq!(key_of(&["authorization", "x-api-key"], &pairs), Ok(("k1".into(), 0)));
        assert_eq!(key_of(&["x-api-key", "authorization"], &pairs), Ok(("k2".into(), 0)));
        let basic = [("authorization", "Basic abc"), ("x-api-key", " k2 ")];
        assert_eq!(key_of(&["authorization", "x-api-key"], &basic), Ok(("k2".into(), 1)));
    }

    #[test]
    fn header_names_match_whatever_their_case() {
        assert_eq!(key_of(&["X-API-Key"], &[("x-api-key", "k2")]), Ok(("k2".into(), 0)));
    }

    #[test]
    fn empty_bare_header_is_no_credential() {
        let h = hdrs(&[("x-api-key", "  ")]);
        assert_eq!(extract(&configured(&["x-api-key"]), &h), Credential::Missing);
    }

    #[test]
    fn format_checks_length_characters_and_prefix() {
        let format = KeyFormat { prefixes: vec!["sk_live_".into()], max_length: 20 };
        assert!(format.accepts(b"sk_live_ab12_cd"));
        assert!(!format.accepts(b"sk_test_ab12_cd"));
        assert!(!format.accepts(b"SK_LIVE_ab12_cd"));
        assert!(!format.accepts(b"sk_live_ab12_cd_toolong"));
        assert!(!format.accepts("sk_live_é".as_bytes()));
        assert!(!format.accepts(b"sk_live_a\x7f"));
    }
}
