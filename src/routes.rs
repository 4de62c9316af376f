//! Route patterns and request paths.
//!
//! A request path can be read two ways by whatever sits behind Envoy: literally, segment by segment as
//! sent, or normalised (percent-decoded, `\` taken as `/`, empty and `.` segments dropped, `..`
//! resolved). keygate authorises a request only if every reading it could be given passes, so no
//! spelling of a path (`..`, `%2F`, `%2e%2e`, `//`, a trailing slash) reaches the upstream with fewer
//! scopes or a weaker tenant binding than its normalised form requires, whether or not Envoy's own
//! path normalisation is on.

use std::borrow::Cow;

/// One segment of a compiled route pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    /// `{name}`: one non-empty segment, captured.
    Capture(String),
}

/// A compiled `path` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    parts: Vec<Part>,
    /// Ends in `/**`: any rest, including none.
    rest: bool,
}

/// The captures of a matched pattern: (capture name, segment as it appears in the view).
pub type Captures<'p, 'r> = Vec<(&'p str, &'r [u8])>;

impl PathPattern {
    /// Compiles `/v1/venues/{venue_id}/treatments` or `/files/**`.
    pub fn parse(pattern: &str) -> Result<Self, String> {
        let body = pattern.strip_prefix('/').ok_or_else(|| format!("must start with '/', got {pattern:?}"))?;
        let mut parts = Vec::new();
        let mut rest = false;
        if !body.is_empty() {
            let segments: Vec<&str> = body.split('/').collect();
            let last = segments.len() - 1;
            for (i, seg) in segments.into_iter().enumerate() {
                if seg == "**" {
                    if i != last {
                        return Err(format!("'**' may only be the last segment, in {pattern:?}"));
                    }
                    rest = true;
                } else {
                    parts.push(parse_segment(seg, pattern)?);
                }
            }
        }
        let mut names: Vec<&str> = parts
            .iter()
            .filter_map(|p| match p {
                Part::Capture(n) => Some(n.as_str()),
                Part::Literal(_) => None,
            })
            .collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w.first() == w.get(1)) {
            return Err(format!("capture {{{}}} appears twice in {pattern:?}", w.first().copied().unwrap_or_default()));
        }
        Ok(PathPattern { parts, rest })
    }

    pub fn has_capture(&self, name: &str) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Capture(n) if n == name))
    }

    /// Matches the segments of one reading of a path; returns the captures.
    pub fn matches<'p, 'r>(&'p self, segments: &'r [Cow<'r, [u8]>]) -> Option<Captures<'p, 'r>> {
        if segments.len() < self.parts.len() || (!self.rest && segments.len() != self.parts.len()) {
            return None;
        }
        let mut captures = Vec::new();
        for (part, seg) in self.parts.iter().zip(segments) {
            match part {
                Part::Literal(lit) if lit.as_bytes() == seg.as_ref() => {}
                Part::Capture(name) if !seg.is_empty() => captures.push((name.as_str(), seg.as_ref())),
                _ => return None,
            }
        }
        Some(captures)
    }
}

fn parse_segment(seg: &str, pattern: &str) -> Result<Part, String> {
    if seg.is_empty() {
        return Err(format!("empty segment in {pattern:?}"));
    }
    if seg == "." || seg == ".." {
        return Err(format!("dot segment in {pattern:?}"));
    }
    if let Some(name) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
        let valid = !name.is_empty() && name.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_');
        if !valid {
            return Err(format!("capture name {seg:?} must be letters, digits or '_', in {pattern:?}"));
        }
        return Ok(Part::Capture(name.to_string()));
    }
    if seg.contains(['{', '}', '*', '%', '\\', '?', '#']) {
        return Err(format!("segment {seg:?} must be plain text or a whole {{name}}, in {pattern:?}"));
    }
    Ok(Part::Literal(seg.to_string()))
}

/// The readings of a request path that keygate authorises. Usually one; two when the path as sent is
/// not in normal form.
#[derive(Debug)]
pub struct PathViews<'a> {
    pub normalised: Vec<Cow<'a, [u8]>>,
    /// The segments as sent, when they differ from the normalised ones.
    pub literal: Option<Vec<Cow<'a, [u8]>>>,
}

impl<'a> PathViews<'a> {
    /// Splits `:path` (query and fragment dropped) into its readings.
    pub fn of(path: &'a [u8]) -> Self {
        let end = path.iter().position(|&c| c == b'?' || c == b'#').unwrap_or(path.len());
        let path = path.get(..end).unwrap_or_default();
        let literal = literal_segments(path);
        let needs_work = path.iter().any(|&c| c == b'%' || c == b'\\')
            || literal.iter().any(|s| s.is_empty() || s.as_ref() == b"." || s.as_ref() == b"..");
        if !needs_work {
            return PathViews { normalised: literal, literal: None };
        }
        let normalised = normalised_segments(path);
        let literal = (literal != normalised).then_some(literal);
        PathViews { normalised, literal }
    }

    /// Every reading, normalised first.
    pub fn all(&self) -> impl Iterator<Item = &[Cow<'a, [u8]>]> {
        std::iter::once(self.normalised.as_slice()).chain(self.literal.as_deref())
    }
}

/// Segments as sent: split on `/`, the leading slash and one trailing slash ignored.
fn literal_segments(path: &[u8]) -> Vec<Cow<'_, [u8]>> {
    let path = path.strip_prefix(b"/").unwrap_or(path);
    let path = path.strip_suffix(b"/").unwrap_or(path);
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|&c| c == b'/').map(Cow::Borrowed).collect()
}

/// Segments after percent-decoding (once), with `\` as a separator, empty and `.` segments dropped and
/// `..` resolved (never above the root).
fn normalised_segments(path: &[u8]) -> Vec<Cow<'_, [u8]>> {
    let decoded = percent_decode(path);
    let mut out: Vec<Cow<'_, [u8]>> = Vec::new();
    for seg in decoded.split(|&c| c == b'/' || c == b'\\') {
        match seg {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            _ => out.push(Cow::Owned(seg.to_vec())),
        }
    }
    out
}

/// Decodes every valid `%XX` once; a `%` not followed by two hex digits stays as it is.
fn percent_decode(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&c) = input.get(i) {
        if c == b'%' {
            let hi = input.get(i + 1).and_then(|&h| hex_value(h));
            let lo = input.get(i + 2).and_then(|&l| hex_value(l));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    out
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(views: &[Cow<'_, [u8]>]) -> Vec<String> {
        views.iter().map(|s| String::from_utf8_lossy(s).into_owned()).collect()
    }

    fn normalised(path: &str) -> Vec<String> {
        segs(&PathViews::of(path.as_bytes()).normalised)
    }

    #[test]
    fn plain_path_has_one_reading() {
        let v = PathViews::of(b"/v1/venues/v_7/treatments?x=1");
        assert_eq!(segs(&v.normalised), ["v1", "venues", "v_7", "treatments"]);
        assert!(v.literal.is_none());
    }

    #[test]
    fn trailing_slash_is_the_same_path() {
        let v = PathViews::of(b"/v1/venues/");
        assert_eq!(segs(&v.normalised), ["v1", "venues"]);
        assert!(v.literal.is_none());
        assert!(PathViews::of(b"/").normalised.is_empty());
        assert!(PathViews::of(b"").normalised.is_empty());
    }

    #[test]
    fn dot_segments_are_resolved_and_the_literal_reading_kept() {
        let v = PathViews::of(b"/v1/venues/v_7/../v_8/treatments");
        assert_eq!(segs(&v.normalised), ["v1", "venues", "v_8", "treatments"]);
        assert_eq!(segs(v.literal.as_deref().unwrap_or_default()), ["v1", "venues", "v_7", "..", "v_8", "treatments"]);
        assert_eq!(normalised("/../../etc"), ["etc"]);
        assert_eq!(normalised("/a/./b/."), ["a", "b"]);
    }

    #[test]
    fn encoded_separators_and_dots_are_decoded() {
        assert_eq!(normalised("/v1/venues/v_7%2F..%2Fv_8/treatments"), ["v1", "venues", "v_8", "treatments"]);
        assert_eq!(normalised("/v1/venues/v_7/%2e%2E/v_8"), ["v1", "venues", "v_8"]);
        assert_eq!(normalised("/v1/venues\\v_8%5Ctreatments"), ["v1", "venues", "v_8", "treatments"]);
        assert_eq!(normalised("/v1/%76enues"), ["v1", "venues"]);
        assert_eq!(normalised("/a%2/b%zz%"), ["a%2", "b%zz%"]);
        assert_eq!(normalised("/a/%252F"), ["a", "%2F"], "decoded once only");
    }

    #[test]
    fn empty_segments_are_dropped_when_normalised() {
        let v = PathViews::of(b"//v1//venues");
        assert_eq!(segs(&v.normalised), ["v1", "venues"]);
        assert_eq!(segs(v.literal.as_deref().unwrap_or_default()), ["", "v1", "", "venues"]);
    }

    #[test]
    fn pattern_captures_and_rest() {
        let p = PathPattern::parse("/v1/venues/{venue_id}/treatments").unwrap();
        let v = PathViews::of(b"/v1/venues/v_7/treatments");
        let caps = p.matches(&v.normalised).unwrap();
        assert_eq!(caps, vec![("venue_id", &b"v_7"[..])]);
        assert!(p.matches(&PathViews::of(b"/v1/venues/v_7").normalised).is_none());
        assert!(p.matches(&PathViews::of(b"/v1/venues/v_7/treatments/x").normalised).is_none());

        let rest = PathPattern::parse("/admin/**").unwrap();
        assert!(rest.matches(&PathViews::of(b"/admin").normalised).is_some());
        assert!(rest.matches(&PathViews::of(b"/admin/a/b").normalised).is_some());
        assert!(rest.matches(&PathViews::of(b"/administrator").normalised).is_none());
        assert!(PathPattern::parse("/**").unwrap().matches(&[]).is_some());
        assert!(PathPattern::parse("/").unwrap().matches(&[]).is_some());
    }

    #[test]
    fn capture_needs_a_non_empty_segment() {
        let p = PathPattern::parse("/v1/{id}/x").unwrap();
        let v = PathViews::of(b"/v1//x");
        assert!(p.matches(v.literal.as_deref().unwrap_or_default()).is_none());
    }

    #[test]
    fn literal_segments_are_case_sensitive() {
        let p = PathPattern::parse("/v1/venues").unwrap();
        assert!(p.matches(&PathViews::of(b"/V1/venues").normalised).is_none());
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in ["v1", "/v1//x", "/v1/../x", "/**/x", "/v{id}", "/{}", "/{a-b}", "/{a}/{a}", "/a%2F", "/a/*"] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
