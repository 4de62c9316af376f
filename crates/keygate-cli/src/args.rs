//! A small command-line parser: `--name VALUE`, `--name=VALUE`, flags, positionals, `--` and
//! `-h`/`--help`. Each command declares its options; anything else is a usage error.

use std::ffi::OsString;

/// One option a command accepts.
#[derive(Debug, Clone, Copy)]
pub struct Opt {
    pub name: &'static str,
    /// Takes a value (`--keys FILE`), else a flag (`--envoy`).
    pub value: bool,
    /// May be given more than once (`--scope a --scope b`).
    pub repeat: bool,
}

pub const fn value(name: &'static str) -> Opt {
    Opt { name, value: true, repeat: false }
}

pub const fn repeated(name: &'static str) -> Opt {
    Opt { name, value: true, repeat: true }
}

pub const fn flag(name: &'static str) -> Opt {
    Opt { name, value: false, repeat: false }
}

/// The parsed arguments of one command.
#[derive(Debug, Default)]
pub struct Parsed {
    pub help: bool,
    options: Vec<(&'static str, OsString)>,
    pub positionals: Vec<OsString>,
}

impl Parsed {
    pub fn parse(args: &[OsString], opts: &[Opt]) -> Result<Parsed, String> {
        let mut parsed = Parsed::default();
        let mut iter = args.iter();
        let mut only_positionals = false;
        while let Some(arg) = iter.next() {
            let text = arg.to_str();
            if only_positionals || !text.is_some_and(|t| t.starts_with('-') && t.len() > 1) {
                parsed.positionals.push(arg.clone());
                continue;
            }
            let text = text.unwrap_or_default();
            if text == "--" {
                only_positionals = true;
                continue;
            }
            if text == "-h" || text == "--help" {
                parsed.help = true;
                continue;
            }
            let (name, inline) = match text.split_once('=') {
                Some((n, v)) => (n, Some(OsString::from(v))),
                None => (text, None),
            };
            let opt = opts.iter().find(|o| o.name == name).ok_or_else(|| format!("unknown option {name}"))?;
            let given = if opt.value {
                match inline {
                    Some(v) => v,
                    None => iter.next().cloned().ok_or_else(|| format!("{name} needs a value"))?,
                }
            } else {
                if inline.is_some() {
                    return Err(format!("{name} takes no value"));
                }
                OsString::new()
            };
            if !opt.repeat && parsed.options.iter().any(|(n, _)| *n == opt.name) {
                return Err(format!("{name} is given twice"));
            }
            parsed.options.push((opt.name, given));
        }
        Ok(parsed)
    }

    pub fn flag(&self, name: &str) -> bool {
        self.options.iter().any(|(n, _)| *n == name)
    }

    pub fn os(&self, name: &str) -> Option<&OsString> {
        self.options.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// A text value; non-UTF-8 is a usage error.
    pub fn text(&self, name: &str) -> Result<Option<String>, String> {
        self.os(name).map(|v| utf8(name, v)).transpose()
    }

    pub fn required_text(&self, name: &str) -> Result<String, String> {
        self.text(name)?.ok_or_else(|| format!("{name} is required"))
    }

    pub fn required_os(&self, name: &str) -> Result<&OsString, String> {
        self.os(name).ok_or_else(|| format!("{name} is required"))
    }

    /// Every value of a repeated option, in order.
    pub fn texts(&self, name: &str) -> Result<Vec<String>, String> {
        self.options.iter().filter(|(n, _)| *n == name).map(|(_, v)| utf8(name, v)).collect()
    }
}

fn utf8(name: &str, v: &OsString) -> Result<String, String> {
    v.to_str().map(str::to_string).ok_or_else(|| format!("{name}: not valid UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    const OPTS: &[Opt] = &[value("--keys"), repeated("--scope"), flag("--envoy")];

    #[test]
    fn values_flags_repeats_and_positionals() {
        let p =
            Parsed::parse(&os(&["a", "--keys=k.json", "--scope", "x", "--scope", "y", "--envoy", "--", "--b"]), OPTS)
                .unwrap();
        assert_eq!(p.text("--keys").unwrap().as_deref(), Some("k.json"));
        assert_eq!(p.texts("--scope").unwrap(), ["x", "y"]);
        assert!(p.flag("--envoy"));
        assert_eq!(p.positionals, os(&["a", "--b"]));
        assert!(!p.help);
        assert!(Parsed::parse(&os(&["-", "--help"]), OPTS).unwrap().help);
    }

    #[test]
    fn usage_errors_are_named() {
        let err = |args: &[&str]| Parsed::parse(&os(args), OPTS).unwrap_err();
        assert_eq!(err(&["--nope"]), "unknown option --nope");
        assert_eq!(err(&["--keys"]), "--keys needs a value");
        assert_eq!(err(&["--keys", "a", "--keys", "b"]), "--keys is given twice");
        assert_eq!(err(&["--envoy=yes"]), "--envoy takes no value");
    }
}
