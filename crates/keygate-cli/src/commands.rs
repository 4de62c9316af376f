//! The commands: new, rotate, revoke, list, hash, check, config, serve. This module parses the
//! command line and reports failures; each family of commands has its own file: [`edit`] (new,
//! rotate, revoke), [`inspect`] (list, hash, check), [`config`] (config), [`serve`] (serve).

mod config;
mod edit;
mod inspect;
mod serve;

use crate::args::{flag, repeated, value, Opt, Parsed};
use crate::{help, keyset};
use std::ffi::OsString;
use std::io::Write;
use std::process::ExitCode;

/// How a command failed.
#[derive(Debug)]
pub enum Fail {
    /// Wrong usage of a command (exit 2).
    Usage { command: &'static str, message: String },
    /// A failure (exit 1), one line.
    Error(String),
    /// Already reported (exit with this status).
    Quiet(u8),
}

impl Fail {
    pub fn report(self) -> ExitCode {
        let (line, code) = match self {
            Fail::Usage { command: "", message } => (format!("keygate: {message} (see keygate --help)"), 2),
            Fail::Usage { command, message } => {
                (format!("keygate {command}: {message} (see keygate {command} --help)"), 2)
            }
            Fail::Error(message) => (format!("keygate: {message}"), 1),
            Fail::Quiet(code) => return ExitCode::from(code),
        };
        note(&line);
        ExitCode::from(code)
    }
}

/// A line on standard error (never a panic, even if standard error is closed).
pub(super) fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Writes to standard output; a closed pipe (`keygate list | head -1`) ends the command quietly.
pub(super) fn emit(text: &str) -> Result<(), Fail> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes()).and_then(|()| out.flush()).map_err(|e| match e.kind() {
        std::io::ErrorKind::BrokenPipe => Fail::Quiet(1),
        _ => Fail::Error(format!("cannot write to standard output: {}", keyset::io_reason(&e))),
    })
}

struct Command {
    name: &'static str,
    help: &'static str,
    opts: &'static [Opt],
    run: fn(&Parsed) -> Result<(), Fail>,
}

const COMMANDS: &[Command] = &[
    Command {
        name: "new",
        help: help::NEW,
        opts: &[
            value("--org"),
            repeated("--scope"),
            repeated("--attr"),
            value("--name"),
            value("--expires"),
            value("--prefix"),
            value("--id"),
            value("--keys"),
            value("--shards"),
        ],
        run: edit::new,
    },
    Command {
        name: "rotate",
        help: help::ROTATE,
        opts: &[value("--keys"), value("--expires"), value("--prefix"), value("--shards")],
        run: edit::rotate,
    },
    Command { name: "revoke", help: help::REVOKE, opts: &[value("--keys"), value("--shards")], run: edit::revoke },
    Command {
        name: "list",
        help: help::LIST,
        opts: &[value("--keys"), value("--prefix"), value("--usage")],
        run: inspect::list,
    },
    Command { name: "hash", help: help::HASH, opts: &[], run: inspect::hash },
    Command { name: "check", help: help::CHECK, opts: &[flag("--envoy")], run: inspect::check },
    Command {
        name: "config",
        help: help::CONFIG,
        opts: &[
            value("--keys"),
            value("--routes"),
            value("--envoy"),
            value("--shards"),
            value("--digits"),
            value("--manifest-version"),
        ],
        run: config::config,
    },
    Command {
        name: "serve",
        help: help::SERVE,
        opts: &[value("--keys"), value("--usage-dir"), value("--listen")],
        run: serve::serve,
    },
];

pub fn run(args: &[OsString]) -> Result<(), Fail> {
    let usage = |message: String| Fail::Usage { command: "", message };
    let Some(first) = args.first() else {
        note(help::MAIN);
        return Err(Fail::Quiet(2));
    };
    let first = first.to_str().unwrap_or_default();
    match first {
        "-h" | "--help" => return emit(help::MAIN),
        "-V" | "--version" => return emit(&format!("keygate {}\n", env!("CARGO_PKG_VERSION"))),
        "help" => {
            let topic = args.get(1).and_then(|a| a.to_str());
            return match topic {
                None => emit(help::MAIN),
                Some(name) => match COMMANDS.iter().find(|c| c.name == name) {
                    Some(c) => emit(c.help),
                    None => Err(usage(format!("no command {name:?}"))),
                },
            };
        }
        _ => {}
    }
    let Some(command) = COMMANDS.iter().find(|c| c.name == first) else {
        return Err(usage(format!(
            "no command {first:?}; the commands are new, rotate, revoke, list, hash, check, config, serve"
        )));
    };
    let rest = args.get(1..).unwrap_or_default();
    let parsed = Parsed::parse(rest, command.opts).map_err(|message| Fail::Usage { command: command.name, message })?;
    if parsed.help {
        return emit(command.help);
    }
    (command.run)(&parsed)
}

pub(super) fn usage(command: &'static str) -> impl Fn(String) -> Fail {
    move |message| Fail::Usage { command, message }
}

pub(super) const DEFAULT_PREFIX: &str = "sk_live_";

/// A prefix must keep the key within what the filter accepts: visible ASCII, no commas.
pub(super) fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.bytes().all(|c| c.is_ascii_graphic() && c != b',') {
        return Err("--prefix: must be visible ASCII without spaces or commas".into());
    }
    if prefix.len() > 64 {
        return Err("--prefix: at most 64 characters".into());
    }
    Ok(())
}

pub(super) fn no_positionals(p: &Parsed, what: &str) -> Result<(), String> {
    match p.positionals.first() {
        None => Ok(()),
        Some(a) => Err(format!("unexpected argument {:?}{what}", a.to_string_lossy())),
    }
}
