//! Configuration errors as data: what kind of problem it is, the path of the field it concerns
//! (`keys[3].hash`, `routes[0].bind.venue_id`), and, for a problem met while reading the JSON text,
//! where in the text. Callers match on [`ErrorKind`]; the text is for people (and Envoy's log).
//!
//! Reading stops at the first problem of the text; compiling what was read goes on past a problem,
//! so one compile reports every problem it finds ([`ConfigErrors`], gathered by [`Problems`]).

use std::borrow::Cow;
use std::fmt;

/// What is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The text is not JSON, or ends early.
    Syntax,
    /// A value of the wrong JSON type: a number where text belongs, a configuration that is not an
    /// object.
    Type,
    /// The object at the error's field lacks the required field `name`.
    Missing { name: String },
    /// A field or variant that is not known; `allowed` lists the known ones (empty if none is).
    Unknown { allowed: &'static [&'static str] },
    /// A name, id, hash or header given twice: `of` is the other place it is given (`keys[0]`; the
    /// error's own path when the two share it, as two members of one name in an object do).
    Duplicate { of: String },
    /// A value refused; the reason says why.
    Invalid,
}

/// A 1-based line and column (in bytes) of the JSON text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// A configuration problem, with the path of the field it concerns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The path of the field (`keys[3].hash`); empty for the whole configuration. For
    /// [`ErrorKind::Missing`], the object that lacks the field.
    pub field: String,
    pub kind: ErrorKind,
    /// Where reading the text stopped, for a problem met while reading it; `None` for a problem
    /// found compiling what was read.
    pub position: Option<Position>,
    reason: String,
}

impl ConfigError {
    /// A value refused ([`ErrorKind::Invalid`]) for `message`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError::of_kind(ErrorKind::Invalid, field, message)
    }

    pub fn of_kind(kind: ErrorKind, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError { field: field.into(), kind, position: None, reason: reason.into() }
    }

    /// A name, id, hash or header that `of` already gives.
    pub fn duplicate(field: impl Into<String>, of: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::of_kind(ErrorKind::Duplicate { of: of.into() }, field, reason)
    }

    /// The same problem, met at `position` of the text.
    pub fn at(self, position: Position) -> Self {
        ConfigError { position: Some(position), ..self }
    }

    /// Why the value is refused, without the position.
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// What [`Display`](fmt::Display) shows after the field: the reason, then ` at line L column C`
    /// when the position is known.
    pub fn message(&self) -> Cow<'_, str> {
        match self.position {
            None => Cow::Borrowed(&self.reason),
            Some(Position { line, column }) => Cow::Owned(format!("{} at line {line} column {column}", self.reason)),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)?;
        if let Some(Position { line, column }) = self.position {
            write!(f, " at line {line} column {column}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem one compile found: at least one, in the order it found them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors {
    /// Boxed, so that a `Result` holding the errors stays small.
    first: Box<ConfigError>,
    rest: Vec<ConfigError>,
    /// Found past [`Problems::LIMIT`], and not kept.
    dropped: usize,
}

impl ConfigErrors {
    /// The first problem found: the one to fix first.
    pub fn first(&self) -> &ConfigError {
        &self.first
    }

    pub fn into_first(self) -> ConfigError {
        *self.first
    }

    /// The problems kept, in the order they were found.
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        std::iter::once(&*self.first).chain(&self.rest)
    }

    /// How many problems are kept.
    pub fn len(&self) -> usize {
        1 + self.rest.len()
    }

    /// Never: there is always a first problem (for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// How many problems were found: those kept and those past [`Problems::LIMIT`].
    pub fn found(&self) -> usize {
        self.len() + self.dropped
    }

    /// Keeps one more problem, up to [`Problems::LIMIT`].
    pub fn push(&mut self, e: ConfigError) {
        if self.len() < Problems::LIMIT {
            self.rest.push(e);
        } else {
            self.dropped += 1;
        }
    }
}

impl Extend<ConfigError> for ConfigErrors {
    fn extend<I: IntoIterator<Item = ConfigError>>(&mut self, errors: I) {
        for e in errors {
            self.push(e);
        }
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::iter::Chain<std::iter::Once<ConfigError>, std::vec::IntoIter<ConfigError>>;

    fn into_iter(self) -> Self::IntoIter {
        std::iter::once(*self.first).chain(self.rest)
    }
}

impl From<ConfigError> for ConfigErrors {
    fn from(first: ConfigError) -> Self {
        ConfigErrors { first: Box::new(first), rest: Vec::new(), dropped: 0 }
    }
}

/// The first problem, as a lone problem shows (`keys[0].hash: expected …`), then how many more.
impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.first)?;
        match self.found() - 1 {
            0 => Ok(()),
            1 => write!(f, " (and 1 more problem)"),
            n => write!(f, " (and {n} more problems)"),
        }
    }
}

impl std::error::Error for ConfigErrors {}

/// The problems a compile has found so far; it goes on past each one.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Problems {
    kept: Vec<ConfigError>,
    dropped: usize,
}

impl Problems {
    /// Problems kept at most: a configuration with a million bad records costs no more memory to
    /// refuse than these, and more are not worth listing.
    pub const LIMIT: usize = 500;

    pub fn push(&mut self, e: ConfigError) {
        if self.kept.len() < Problems::LIMIT {
            self.kept.push(e);
        } else {
            self.dropped += 1;
        }
    }

    /// The value of `result`, or `None` with its error kept.
    pub fn take<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        result.map_err(|e| self.push(e)).ok()
    }

    /// Takes every problem of `other`, after those found so far.
    pub fn append(&mut self, other: Problems) {
        self.dropped += other.dropped;
        self.extend(other.kept);
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty() && self.dropped == 0
    }

    /// How many problems were found.
    pub fn found(&self) -> usize {
        self.kept.len() + self.dropped
    }

    /// `value()` if no problem was found, else every problem.
    pub fn finish<T>(self, value: impl FnOnce() -> T) -> Result<T, ConfigErrors> {
        match self.into_errors() {
            None => Ok(value()),
            Some(errors) => Err(errors),
        }
    }

    /// Every problem, if any was found.
    pub fn into_errors(self) -> Option<ConfigErrors> {
        if self.kept.is_empty() {
            return None;
        }
        let mut kept = self.kept.into_iter();
        let first = kept.next()?;
        Some(ConfigErrors { first: Box::new(first), rest: kept.collect(), dropped: self.dropped })
    }
}

impl Extend<ConfigError> for Problems {
    fn extend<I: IntoIterator<Item = ConfigError>>(&mut self, errors: I) {
        for e in errors {
            self.push(e);
        }
    }
}

/// The problems kept.
impl IntoIterator for Problems {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.kept.into_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_shows_its_field_reason_and_position() {
        let e = ConfigError::of_kind(ErrorKind::Missing { name: "org".into() }, "keys[3]", "missing field `org`");
        assert_eq!(e.to_string(), "keys[3]: missing field `org`");
        let e = e.at(Position { line: 2, column: 7 });
        assert_eq!(e.to_string(), "keys[3]: missing field `org` at line 2 column 7");
        assert_eq!(e.message(), "missing field `org` at line 2 column 7");
        assert_eq!(e.reason(), "missing field `org`");
        assert_eq!(ConfigError::new("", "configuration is empty").to_string(), "configuration is empty");
        assert_eq!(ConfigError::new("a", "b").kind, ErrorKind::Invalid);
    }

    #[test]
    fn several_errors_show_the_first_and_how_many_more() {
        let mut problems = Problems::default();
        assert!(problems.is_empty());
        problems.push(ConfigError::new("a", "one"));
        let one = problems.clone().finish(|| ()).unwrap_err();
        assert_eq!(one.to_string(), "a: one");
        problems.push(ConfigError::duplicate("b", "a", "two"));
        problems.push(ConfigError::new("c", "three"));
        let all = problems.finish(|| ()).unwrap_err();
        assert_eq!(all.to_string(), "a: one (and 2 more problems)");
        assert_eq!(all.iter().map(|e| e.field.as_str()).collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(all.iter().nth(1).map(|e| &e.kind), Some(&ErrorKind::Duplicate { of: "a".into() }));
        assert_eq!(Problems::default().finish(|| 7), Ok(7));
    }

    #[test]
    fn problems_past_the_limit_are_counted_not_kept() {
        let mut problems = Problems::default();
        for i in 0..Problems::LIMIT + 3 {
            problems.push(ConfigError::new(format!("keys[{i}]"), "bad"));
        }
        let all = problems.finish(|| ()).unwrap_err();
        assert_eq!((all.len(), all.found()), (Problems::LIMIT, Problems::LIMIT + 3));
        assert!(all.to_string().ends_with(&format!("(and {} more problems)", Problems::LIMIT + 2)));
    }
}
