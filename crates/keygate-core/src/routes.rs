//! Route patterns and request paths.
//!
//! Whatever sits behind Envoy reads a request path in its own way: literally, segment by segment as
//! sent; normalised (percent-decoded, `\` taken as `/`, empty and `.` segments dropped, `..`
//! resolved); with path parameters stripped from every segment first, so that `..;` is `..` (Tomcat,
//! Jetty, Spring); decoded twice (a proxy that decodes and forwards, then the application); and with
//! the case of literal segments ignored (Express, ASP.NET Core). keygate authorises a request only if
//! every reading passes, so no spelling of a path (`..`, `..;`, `;x=1`, `%2F`, `%2e%2e`, `%252e`, `//`,
//! a trailing slash, `/V1`) reaches the upstream with fewer scopes or a weaker tenant binding than
//! some reading requires, whether or not Envoy's own path normalisation is on.

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

/// How literal segments of a pattern are compared with a path's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Case {
    /// Byte for byte.
    Exact,
    /// Ignoring case, as a case-insensitive router does: ASCII letters, the four characters outside
    /// ASCII that Unicode's simple case mappings take to ASCII letters (`ſ` is `s`, `ı` and `İ` are
    /// `i`, `K` is `k`, as .NET's `OrdinalIgnoreCase` and Java's `equalsIgnoreCase` read them), and
    /// those that full case folding takes to several (`ß` is `ss`, `ﬁ` is `fi`, as Python's
    /// `casefold` reads them). Captures are kept as sent.
    Folded,
}

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

    /// True if every literal segment is lower-case ASCII: then a path with no upper-case letter and
    /// no byte outside ASCII matches the same way exactly and folded.
    pub fn literals_are_lower_ascii(&self) -> bool {
        self.parts.iter().all(|p| match p {
            Part::Literal(l) => l.bytes().all(|c| c.is_ascii() && !c.is_ascii_uppercase()),
            Part::Capture(_) => true,
        })
    }

    /// True if this pattern matches every path `other` matches, in either case (so a route with it,
    /// listed first, leaves `other` nothing to match).
    pub fn covers(&self, other: &PathPattern) -> bool {
        let lengths_ok = if self.rest {
            other.parts.len() >= self.parts.len()
        } else {
            !other.rest && other.parts.len() == self.parts.len()
        };
        lengths_ok
            && self.parts.iter().zip(&other.parts).all(|pair| match pair {
                (Part::Capture(_), _) => true,
                (Part::Literal(a), Part::Literal(b)) => a.eq_ignore_ascii_case(b),
                (Part::Literal(_), Part::Capture(_)) => false,
            })
    }

    /// Matches the segments of one reading of a path; returns the captures.
    pub fn matches<'p, 'r>(&'p self, segments: &'r [Cow<'r, [u8]>], case: Case) -> Option<Captures<'p, 'r>> {
        if segments.len() < self.parts.len() || (!self.rest && segments.len() != self.parts.len()) {
            return None;
        }
        let mut captures = Vec::new();
        for (part, seg) in self.parts.iter().zip(segments) {
            match part {
                Part::Literal(lit) if literal_eq(lit, seg, case) => {}
                Part::Capture(name) if !seg.is_empty() => captures.push((name.as_str(), seg.as_ref())),
                _ => return None,
            }
        }
        Some(captures)
    }
}

fn literal_eq(lit: &str, seg: &[u8], case: Case) -> bool {
    if lit.as_bytes() == seg {
        return true;
    }
    if case == Case::Exact {
        return false;
    }
    if seg.is_ascii() {
        return lit.as_bytes().eq_ignore_ascii_case(seg);
    }
    // Literals are ASCII (see `parse_segment`); a few characters outside ASCII fold onto ASCII
    // letters.
    let Ok(seg) = std::str::from_utf8(seg) else { return false };
    let mut lit = lit.bytes();
    let mut one = [0u8; 4];
    for c in seg.chars() {
        let ascii: &[u8] = match c {
            '\u{17f}' => b"s",  // LATIN SMALL LETTER LONG S, upper-cased to S
            '\u{131}' => b"i",  // LATIN SMALL LETTER DOTLESS I, upper-cased to I
            '\u{130}' => b"i",  // LATIN CAPITAL LETTER I WITH DOT ABOVE, lower-cased to i (Java)
            '\u{212a}' => b"k", // KELVIN SIGN, lower-cased to k
            // Full case folding (Python's `casefold`, ICU, Rust's `unicase`) and JavaScript's and
            // Python's `upper` take these to two or three ASCII letters.
            '\u{df}' | '\u{1e9e}' => b"ss", // SHARP S
            '\u{fb00}' => b"ff",
            '\u{fb01}' => b"fi",
            '\u{fb02}' => b"fl",
            '\u{fb03}' => b"ffi",
            '\u{fb04}' => b"ffl",
            '\u{fb05}' | '\u{fb06}' => b"st",
            c if c.is_ascii() => c.encode_utf8(&mut one).as_bytes(),
            _ => return false,
        };
        if !ascii.iter().all(|a| lit.next().is_some_and(|l| l.eq_ignore_ascii_case(a))) {
            return false;
        }
    }
    lit.next().is_none()
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
    if seg.contains(['{', '}', '*', '%', '\\', '?', '#', ';']) {
        return Err(format!("segment {seg:?} must be plain text or a whole {{name}}, in {pattern:?}"));
    }
    if !seg.bytes().all(|c| c.is_ascii_graphic()) {
        // A case-insensitive router folds letters outside ASCII in ways keygate does not follow.
        return Err(format!("segment {seg:?} must be visible ASCII, in {pattern:?}"));
    }
    Ok(Part::Literal(seg.to_string()))
}

/// One reading of a path: its segments.
pub type Segments<'a> = Vec<Cow<'a, [u8]>>;

/// How many bytes of paths not in normal form one request may ask keygate to read in every way (its
/// `:path` and URL-override headers together); a request with more is refused, which bounds the work
/// it costs. Most servers refuse a request line over 8 KiB anyway (ASP.NET Core, Tomcat, nginx,
/// Apache).
pub const MAX_READ_PATH: usize = 8192;

/// The readings of a request path that keygate authorises, without repeats. Usually one; more when
/// the path as sent is not in normal form.
#[derive(Debug)]
pub struct PathViews<'a> {
    /// The normalised reading first.
    readings: Vec<Segments<'a>>,
    /// Not in normal form and longer than what was left of [`MAX_READ_PATH`]: not read, to be refused.
    too_long: bool,
}

impl<'a> PathViews<'a> {
    /// Splits `:path` (query and fragment dropped) into its readings.
    pub fn of(path: &'a [u8]) -> Self {
        let mut budget = MAX_READ_PATH;
        PathViews::within(path, &mut budget)
    }

    /// [`PathViews::of`], taking the length of a path not in normal form from `budget`; one longer
    /// than what is left is not read and is [`PathViews::too_long`].
    pub fn within(path: &'a [u8], budget: &mut usize) -> Self {
        let end = path.iter().position(|&c| c == b'?' || c == b'#').unwrap_or(path.len());
        let path = path.get(..end).unwrap_or_default();
        let literal = literal_segments(path);
        let needs_work = path.iter().any(|&c| c == b'%' || c == b'\\' || c == b';')
            || literal.iter().any(|s| s.is_empty() || s.as_ref() == b"." || s.as_ref() == b"..");
        if !needs_work {
            return PathViews { readings: vec![literal], too_long: false };
        }
        let Some(left) = budget.checked_sub(path.len()) else {
            return PathViews { readings: vec![literal], too_long: true };
        };
        *budget = left;
        let escaped = path.contains(&b'%');
        let once = percent_decode(path);
        let mut views = PathViews { readings: Vec::with_capacity(8), too_long: false };
        views.add_resolved(&once);
        // Go's ServeMux and Spring's PathPattern split the path as sent, then decode each segment
        // (`%2F` is part of a segment to them), and resolve nothing.
        let each_decoded = escaped.then(|| decoded_each(&literal));
        views.add(literal);
        if let Some(each) = each_decoded {
            views.add(each);
        }
        if escaped {
            // ASP.NET Core (Kestrel), Envoy's own `normalize_path`, Apache's `NoDecode` and WHATWG URL
            // parsers decode everything but an encoded `/` (and `\`), then resolve dot segments.
            let kept = decode_keeping_separators(path);
            // A proxy that normalises and forwards (nginx; Envoy's normalize_path in a sidecar), then
            // an application that decodes and resolves what is left: dots that appear only then are
            // resolved against a path whose first dots are gone.
            let first = [resolved_segments(&once, false, false), resolved_segments(&kept, true, true)];
            for forwarded in first.iter().map(|segments| joined(segments)).filter(|f| has_escape(f)) {
                views.add_resolved(&percent_decode(&forwarded));
            }
            if kept != once {
                views.add_resolved(&kept);
            }
        }
        if let Some(rest) = after_authority(path) {
            // A WHATWG URL parser (Node's `new URL(req.url, base)`) reads `//docs/v1/x` as host
            // `docs` and path `/v1/x`; its `\` is a `/`.
            views.add_resolved(&decode_keeping_separators(rest));
            views.add_resolved(&percent_decode(rest));
        }
        if has_percent_u(path) {
            // IIS (HTTP.sys) decodes `%uXXXX` (`%u002e` is `.`) before it resolves the path.
            views.add_resolved(&percent_u_decode(path));
        }
        if path.contains(&b';') {
            // Tomcat, Jetty, Spring: parameters stripped from the path as sent, then decoded.
            let stripped = strip_parameters(path);
            views.add_resolved(&percent_decode(&stripped));
            if escaped {
                views.add(decoded_each(&literal_segments(&stripped)));
            }
        }
        // A second decoding: an application behind a proxy that decoded before forwarding.
        let twice = has_escape(&once).then(|| percent_decode(&once));
        if let Some(twice) = &twice {
            views.add_resolved(twice);
        }
        for decoded in std::iter::once(&once).chain(twice.as_ref()) {
            if decoded.contains(&b';') {
                // Parameters stripped after decoding (`%3B` too).
                views.add_resolved(&strip_parameters(decoded));
            }
            if let Some(nul) = decoded.iter().position(|&c| c == 0) {
                // C string handling ends the path at a decoded NUL.
                views.add_resolved(decoded.get(..nul).unwrap_or_default());
            }
        }
        views
    }

    /// Adds `path` with dot segments resolved, `\` taken as a separator (Windows servers, Envoy's
    /// normalisation, WHATWG URLs) and, if it holds one, also not (nginx, Apache, Jetty, Go split on
    /// `/` alone); empty segments dropped first (Go, Tomcat, nginx) and, if it has any, also kept, as
    /// RFC 3986's dot removal keeps them (ASP.NET Core, Envoy's `normalize_path`, WHATWG URLs, nginx
    /// with `merge_slashes off`): to those `/a//..` is `/a/`, not `/`.
    fn add_resolved(&mut self, path: &[u8]) {
        let backslash = path.contains(&b'\\');
        self.add(resolved_segments(path, true, false));
        if backslash {
            self.add(resolved_segments(path, false, false));
        }
        let separator = |c: &u8| *c == b'/' || *c == b'\\';
        if path.windows(2).any(|w| w.iter().all(separator)) {
            self.add(resolved_segments(path, true, true));
            if backslash {
                self.add(resolved_segments(path, false, true));
            }
        }
    }

    fn add(&mut self, reading: Segments<'a>) {
        if !self.readings.contains(&reading) {
            self.readings.push(reading);
        }
    }

    /// True if the path is not in normal form and too long to be read in every way: refuse it.
    pub fn too_long(&self) -> bool {
        self.too_long
    }

    /// The normalised reading: decoded once, dot segments resolved.
    pub fn normalised(&self) -> &[Cow<'a, [u8]>] {
        self.readings.first().map(Vec::as_slice).unwrap_or_default()
    }

    /// Every reading, normalised first.
    pub fn all(&self) -> impl Iterator<Item = &[Cow<'a, [u8]>]> {
        self.readings.iter().map(Vec::as_slice)
    }

    /// True if no reading has an upper-case ASCII letter or a byte outside ASCII: then folded and
    /// exact matching agree for patterns whose literals are lower-case ASCII.
    pub fn all_lower_ascii(&self) -> bool {
        self.all().flatten().all(|s| s.iter().all(|&c| c.is_ascii() && !c.is_ascii_uppercase()))
    }
}

/// Segments as sent: split on `/`, the leading slash and one trailing slash ignored.
fn literal_segments(path: &[u8]) -> Segments<'_> {
    let path = path.strip_prefix(b"/").unwrap_or(path);
    let path = path.strip_suffix(b"/").unwrap_or(path);
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|&c| c == b'/').map(Cow::Borrowed).collect()
}

/// Segments split on `/` (and `\` when `backslash`), `.` segments dropped and `..` resolved (never
/// above the root). Empty segments are dropped, or with `keep_empty` kept as RFC 3986's dot removal
/// keeps them (a `..` after one removes only it; one trailing empty segment, a trailing slash, is
/// the same path).
fn resolved_segments(path: &[u8], backslash: bool, keep_empty: bool) -> Segments<'static> {
    let separator = |c: &u8| *c == b'/' || (backslash && *c == b'\\');
    let body = match path.split_first() {
        Some((first, rest)) if keep_empty && separator(first) => rest,
        _ => path,
    };
    let mut out: Segments<'static> = Vec::new();
    for seg in body.split(separator) {
        match seg {
            b"." => {}
            b"" if !keep_empty => {}
            b".." => {
                out.pop();
            }
            _ => out.push(Cow::Owned(seg.to_vec())),
        }
    }
    if keep_empty && out.last().is_some_and(|s| s.is_empty()) {
        out.pop();
    }
    out
}

/// Segments written out as a path again.
fn joined(segments: &[Cow<'_, [u8]>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(segments.iter().map(|s| s.len() + 1).sum());
    for segment in segments {
        out.push(b'/');
        out.extend_from_slice(segment);
    }
    out
}

/// Each segment percent-decoded on its own: an encoded `/` stays inside its segment.
fn decoded_each(segments: &[Cow<'_, [u8]>]) -> Segments<'static> {
    segments.iter().map(|s| Cow::Owned(percent_decode(s))).collect()
}

/// What follows the authority of a path that a WHATWG URL parser reads as scheme-relative: one
/// starting with two separators (`/` or `\`; any more are skipped), then a host up to the next one.
/// `None` for any other path, or one of separators only (no host: the parser fails).
fn after_authority(path: &[u8]) -> Option<&[u8]> {
    let separator = |c: &u8| *c == b'/' || *c == b'\\';
    if !(path.first().is_some_and(separator) && path.get(1).is_some_and(separator)) {
        return None;
    }
    let host = path.get(path.iter().position(|c| !separator(c))?..)?;
    host.get(host.iter().position(separator).unwrap_or(host.len())..)
}

/// Removes every segment's parameters: from a `;` to the end of its segment (`/a;x=1/..;/b` is
/// `/a/../b`).
fn strip_parameters(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut in_parameters = false;
    for &c in path {
        match c {
            b'/' => {
                in_parameters = false;
                out.push(c);
            }
            b';' => in_parameters = true,
            _ if !in_parameters => out.push(c),
            _ => {}
        }
    }
    out
}

/// True if `input` holds a valid `%XX` escape.
fn has_escape(input: &[u8]) -> bool {
    input.windows(3).any(|w| matches!(w, [b'%', h, l] if hex_value(*h).is_some() && hex_value(*l).is_some()))
}

/// Decodes every valid `%XX` once; a `%` not followed by two hex digits stays as it is.
pub fn percent_decode(input: &[u8]) -> Vec<u8> {
    decode(input, false, false)
}

/// Decodes every valid `%XX` once but `%2F` and `%5C`, which stay encoded, as ASP.NET Core and
/// Envoy's `normalize_path` leave an encoded separator.
fn decode_keeping_separators(input: &[u8]) -> Vec<u8> {
    decode(input, true, false)
}

/// Decodes `%uXXXX` (IIS's HTTP.sys) as well as `%XX`.
fn percent_u_decode(input: &[u8]) -> Vec<u8> {
    decode(input, false, true)
}

/// True if `input` holds a `%uXXXX` escape.
fn has_percent_u(input: &[u8]) -> bool {
    input.windows(6).any(|w| percent_u(w).is_some())
}

/// The character of a `%uXXXX` escape at the start of `input`.
fn percent_u(input: &[u8]) -> Option<char> {
    let [b'%', b'u' | b'U', digits @ ..] = input.get(..6)? else { return None };
    let code = digits.iter().try_fold(0u32, |acc, &c| Some(acc << 4 | u32::from(hex_value(c)?)))?;
    char::from_u32(code)
}

fn decode(input: &[u8], keep_separators: bool, percent_u_too: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(input.len());
    let mut i = 0;
    while let Some(&c) = input.get(i) {
        if c == b'%' {
            let hi = input.get(i + 1).and_then(|&h| hex_value(h));
            let lo = input.get(i + 2).and_then(|&l| hex_value(l));
            if let (Some(hi), Some(lo)) = (hi, lo) {
                let byte = hi << 4 | lo;
                if !(keep_separators && (byte == b'/' || byte == b'\\')) {
                    out.push(byte);
                    i += 3;
                    continue;
                }
            }
            if let Some(ch) = percent_u_too.then(|| input.get(i..).and_then(percent_u)).flatten() {
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                i += 6;
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

    fn readings(path: &str) -> Vec<Vec<String>> {
        PathViews::of(path.as_bytes()).all().map(segs).collect()
    }

    fn normalised(path: &str) -> Vec<String> {
        segs(PathViews::of(path.as_bytes()).normalised())
    }

    fn owned(segments: &[&str]) -> Vec<String> {
        segments.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn plain_path_has_one_reading() {
        assert_eq!(readings("/v1/venues/v_7/treatments?x=1"), [owned(&["v1", "venues", "v_7", "treatments"])]);
    }

    #[test]
    fn trailing_slash_is_the_same_path() {
        assert_eq!(readings("/v1/venues/"), [owned(&["v1", "venues"])]);
        assert!(PathViews::of(b"/").normalised().is_empty());
        assert!(PathViews::of(b"").normalised().is_empty());
    }

    #[test]
    fn dot_segments_are_resolved_and_the_literal_reading_kept() {
        assert_eq!(
            readings("/v1/venues/v_7/../v_8/treatments"),
            [owned(&["v1", "venues", "v_8", "treatments"]), owned(&["v1", "venues", "v_7", "..", "v_8", "treatments"])]
        );
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
        assert_eq!(normalised("/a/%252F"), ["a", "%2F"], "the normal form decodes once");
    }

    #[test]
    fn empty_segments_are_dropped_when_normalised() {
        assert_eq!(normalised("/v1//venues"), ["v1", "venues"]);
        assert_eq!(readings("/v1//venues"), [owned(&["v1", "venues"]), owned(&["v1", "", "venues"])]);
    }

    #[test]
    fn a_dot_dot_after_an_empty_segment_removes_only_it_in_a_reading_of_its_own() {
        // RFC 3986's dot removal (ASP.NET Core, Envoy's normalize_path, WHATWG URLs): `/a//..` is `/a/`.
        let all = readings("/docs/../v1/venues/v_8/treatments//..//..//..//../docs/x");
        assert_eq!(all.first(), Some(&owned(&["docs", "x"])));
        assert!(all.contains(&owned(&["v1", "venues", "v_8", "treatments", "docs", "x"])), "{all:?}");
        assert!(readings("/a/b//../").contains(&owned(&["a", "b"])), "a trailing slash is the same path");
    }

    #[test]
    fn an_encoded_slash_is_kept_in_a_reading_of_its_own() {
        // ASP.NET Core and Envoy's normalize_path decode all but `%2F`, then resolve the dots.
        let all = readings("/v1/venues/v_7/treatments/a%2F..%2F..%2F..%2F..%2F..%2Fdocs%2Fx/..");
        assert_eq!(all.first(), Some(&owned(&["docs"])));
        assert!(all.contains(&owned(&["v1", "venues", "v_7", "treatments"])), "{all:?}");
        // Go's ServeMux and Spring's PathPattern decode each segment as sent.
        assert!(readings("/v1/%76enues/v_7%2Fx/t").contains(&owned(&["v1", "venues", "v_7/x", "t"])));
        assert!(readings("/v1/%76enues;a=1/v_7%2Fx/t").contains(&owned(&["v1", "venues", "v_7/x", "t"])));
    }

    #[test]
    fn a_leading_double_slash_is_also_read_as_an_authority() {
        // Node's `new URL(req.url, base)`: `//docs/v1/x` is host `docs`, path `/v1/x`.
        for path in ["//docs/v1/x", "/\\docs/v1/x", "\\\\docs\\v1/x", "////docs/v1/x", "//docs/v1/%2e%2e/v1/x"] {
            assert!(readings(path).contains(&owned(&["v1", "x"])), "{path}: {:?}", readings(path));
        }
        assert!(readings("//docs").contains(&owned(&[])));
        assert_eq!(after_authority(b"//"), None);
        assert_eq!(after_authority(b"/docs//x"), None);
    }

    #[test]
    fn a_percent_u_escape_is_decoded_in_a_reading_of_its_own() {
        // IIS's HTTP.sys decodes `%uXXXX`.
        let all = readings("/docs/%u002e%u002E/v1/venues/v_8/x");
        assert!(all.contains(&owned(&["v1", "venues", "v_8", "x"])), "{all:?}");
        assert!(readings("/a/%u017Fx").contains(&owned(&["a", "\u{17f}x"])));
        assert!(!has_percent_u(b"/a/%u00"), "too short");
        assert!(!has_percent_u(b"/a/%uD800"), "a surrogate is no character");
    }

    #[test]
    fn path_parameters_are_stripped_in_a_reading_of_their_own() {
        assert_eq!(
            readings("/docs/..;/v1/venues/v_8/treatments"),
            [
                owned(&["docs", "..;", "v1", "venues", "v_8", "treatments"]),
                owned(&["v1", "venues", "v_8", "treatments"])
            ]
        );
        let target = owned(&["v1", "venues", "v_8", "x"]);
        for path in ["/v1/venues/v_7/..;/v_8/x", "/v1/venues;x=1/v_8/x;y=2", "/v1/venues/v_7/.;/..;a=b/v_8/x"] {
            assert!(readings(path).contains(&target), "{path}: {:?}", readings(path));
        }
        assert!(readings("/v1/venues%3Bx/v_8/x").contains(&target), "an encoded ';' too");
    }

    #[test]
    fn a_second_decoding_is_a_reading_too() {
        let all = readings("/v1/venues/v_7/%252e%252e/v_8/x");
        assert_eq!(all.first(), Some(&owned(&["v1", "venues", "v_7", "%2e%2e", "v_8", "x"])));
        assert!(all.contains(&owned(&["v1", "venues", "v_8", "x"])), "{all:?}");
    }

    #[test]
    fn a_backslash_is_read_as_a_separator_and_as_a_character() {
        let all = readings("/docs/../v1/venues/v_8/y\\..\\..\\..\\..\\docs\\a\\b/../treatments");
        assert!(all.contains(&owned(&["v1", "venues", "v_8", "treatments"])), "{all:?}");
        assert!(all.contains(&owned(&["docs", "a", "treatments"])), "{all:?}");
        let all = readings("/docs/../v1/venues/v_8/y%5C..%5C..%5C..%5C..%5Cdocs/../treatments");
        assert!(all.contains(&owned(&["v1", "venues", "v_8", "treatments"])), "{all:?}");
    }

    #[test]
    fn a_decoded_nul_ends_a_reading() {
        assert!(readings("/v1/venues/v_7/treatments%00/../../../../docs").contains(&owned(&[
            "v1",
            "venues",
            "v_7",
            "treatments"
        ])));
    }

    #[test]
    fn readings_are_not_repeated() {
        assert_eq!(readings("/a/%62"), [owned(&["a", "b"]), owned(&["a", "%62"])]);
        assert_eq!(readings("/a;/b"), [owned(&["a;", "b"]), owned(&["a", "b"])]);
    }

    #[test]
    fn pattern_captures_and_rest() {
        let p = PathPattern::parse("/v1/venues/{venue_id}/treatments").unwrap();
        let v = PathViews::of(b"/v1/venues/v_7/treatments");
        let caps = p.matches(v.normalised(), Case::Exact).unwrap();
        assert_eq!(caps, vec![("venue_id", &b"v_7"[..])]);
        assert!(p.matches(PathViews::of(b"/v1/venues/v_7").normalised(), Case::Exact).is_none());
        assert!(p.matches(PathViews::of(b"/v1/venues/v_7/treatments/x").normalised(), Case::Exact).is_none());

        let rest = PathPattern::parse("/admin/**").unwrap();
        assert!(rest.matches(PathViews::of(b"/admin").normalised(), Case::Exact).is_some());
        assert!(rest.matches(PathViews::of(b"/admin/a/b").normalised(), Case::Exact).is_some());
        assert!(rest.matches(PathViews::of(b"/administrator").normalised(), Case::Exact).is_none());
        assert!(PathPattern::parse("/**").unwrap().matches(&[], Case::Exact).is_some());
        assert!(PathPattern::parse("/").unwrap().matches(&[], Case::Exact).is_some());
    }

    #[test]
    fn capture_needs_a_non_empty_segment() {
        let p = PathPattern::parse("/v1/{id}/x").unwrap();
        let v = PathViews::of(b"/v1//x");
        assert!(v.all().skip(1).all(|reading| p.matches(reading, Case::Exact).is_none()));
    }

    #[test]
    fn literal_segments_match_exactly_or_folded() {
        let p = PathPattern::parse("/v1/venues/{id}").unwrap();
        let v = PathViews::of(b"/V1/VENUES/V_8");
        assert!(p.matches(v.normalised(), Case::Exact).is_none());
        assert_eq!(p.matches(v.normalised(), Case::Folded), Some(vec![("id", &b"V_8"[..])]), "captures as sent");
        // U+017F (long s) upper-cases to S; U+0131 (dotless i) to I; U+212A (Kelvin) lower-cases to k.
        for spelled in ["/v1/venue\u{17f}/x", "/V1/VENUE\u{17f}/x", "/v1/venue%C5%BF/x"] {
            let v = PathViews::of(spelled.as_bytes());
            assert!(p.matches(v.normalised(), Case::Folded).is_some(), "{spelled}");
            assert!(p.matches(v.normalised(), Case::Exact).is_none(), "{spelled}");
        }
        let admin = PathPattern::parse("/admin").unwrap();
        for dotted in ["/adm\u{131}n", "/adm\u{130}n", "/adm%C4%B0n"] {
            assert!(admin.matches(PathViews::of(dotted.as_bytes()).normalised(), Case::Folded).is_some(), "{dotted}");
        }
        let access = PathPattern::parse("/v1/access/files").unwrap();
        for spelled in ["/v1/acce\u{df}/\u{fb01}les", "/V1/ACCE\u{1e9e}/FILES", "/v1/acce%C3%9F/%EF%AC%81les"] {
            let v = PathViews::of(spelled.as_bytes());
            assert!(access.matches(v.normalised(), Case::Folded).is_some(), "{spelled}");
        }
        assert!(access.matches(PathViews::of("/v1/acce\u{df}s/files".as_bytes()).normalised(), Case::Folded).is_none());
        let kelvin = PathPattern::parse("/kv").unwrap();
        assert!(kelvin.matches(PathViews::of("/\u{212a}V".as_bytes()).normalised(), Case::Folded).is_some());
        assert!(p.matches(PathViews::of(b"/v1/venuesx/x").normalised(), Case::Folded).is_none());
        assert!(p.matches(PathViews::of(b"/v1/venue/x").normalised(), Case::Folded).is_none());
        assert!(p.literals_are_lower_ascii());
        assert!(!PathPattern::parse("/v1/Venues").unwrap().literals_are_lower_ascii());
    }

    #[test]
    fn a_pattern_covers_the_patterns_it_leaves_nothing_to() {
        let p = |s: &str| PathPattern::parse(s).unwrap();
        assert!(p("/v1/venues/{id}/**").covers(&p("/v1/venues/{v}/bookings")));
        assert!(p("/v1/venues/{id}/**").covers(&p("/v1/venues/{v}")));
        assert!(p("/v1/{a}").covers(&p("/V1/x")));
        assert!(p("/**").covers(&p("/")));
        assert!(p("/a/b").covers(&p("/A/B")));
        assert!(!p("/v1/venues/{id}").covers(&p("/v1/venues/{v}/bookings")));
        assert!(!p("/v1/venues/x").covers(&p("/v1/venues/{v}")));
        assert!(!p("/v1/venues/{id}").covers(&p("/v1/venues/{v}/**")));
        assert!(!p("/v1/venues/{id}/bookings").covers(&p("/v1/venues/{v}/**")));
    }

    #[test]
    fn bad_patterns_are_rejected() {
        for bad in [
            "v1",
            "/v1//x",
            "/v1/../x",
            "/**/x",
            "/v{id}",
            "/{}",
            "/{a-b}",
            "/{a}/{a}",
            "/a%2F",
            "/a/*",
            "/a;b",
            "/caf\u{e9}",
            "/a b",
        ] {
            assert!(PathPattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
