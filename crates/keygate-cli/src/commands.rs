//! The commands: new, revoke, list, hash, check, config.

use crate::args::{flag, repeated, value, Opt, Parsed};
use crate::{check, clock, envoy, help, json, keyset, shards};
use keygate_core::error::ConfigError;
use keygate_core::keys::hash_key;
use keygate_core::keys::record::{compile_key, Expiry, RawKey};
use keygate_core::plugin::Plugin;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
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
fn note(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Writes to standard output; a closed pipe (`keygate list | head -1`) ends the command quietly.
fn emit(text: &str) -> Result<(), Fail> {
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
        ],
        run: new,
    },
    Command { name: "revoke", help: help::REVOKE, opts: &[value("--keys")], run: revoke },
    Command { name: "list", help: help::LIST, opts: &[value("--keys"), value("--prefix")], run: list },
    Command { name: "hash", help: help::HASH, opts: &[], run: hash },
    Command { name: "check", help: help::CHECK, opts: &[flag("--envoy")], run: check },
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
        run: config,
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
        return Err(usage(format!("no command {first:?}; the commands are new, revoke, list, hash, check, config")));
    };
    let rest = args.get(1..).unwrap_or_default();
    let parsed = Parsed::parse(rest, command.opts).map_err(|message| Fail::Usage { command: command.name, message })?;
    if parsed.help {
        return emit(command.help);
    }
    (command.run)(&parsed)
}

fn usage(command: &'static str) -> impl Fn(String) -> Fail {
    move |message| Fail::Usage { command, message }
}

const DEFAULT_PREFIX: &str = "sk_live_";

/// A prefix must keep the key within what the filter accepts: visible ASCII, no commas.
fn check_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.bytes().all(|c| c.is_ascii_graphic() && c != b',') {
        return Err("--prefix: must be visible ASCII without spaces or commas".into());
    }
    if prefix.len() > 64 {
        return Err("--prefix: at most 64 characters".into());
    }
    Ok(())
}

fn no_positionals(p: &Parsed, what: &str) -> Result<(), String> {
    match p.positionals.first() {
        None => Ok(()),
        Some(a) => Err(format!("unexpected argument {:?}{what}", a.to_string_lossy())),
    }
}

fn random_hex(bytes: usize) -> Result<String, Fail> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| Fail::Error(format!("the operating system's random source failed: {e}")))?;
    Ok(hex::encode(buf))
}

/// Which option a field of the new record came from.
fn option_of(e: &ConfigError) -> String {
    let field = e.field.strip_prefix("record.").unwrap_or(&e.field);
    let option = if field.starts_with("scopes") {
        "--scope".to_string()
    } else if let Some(name) = field.strip_prefix("attributes.") {
        format!("--attr {name}=…")
    } else if field == "attributes" {
        "--attr".to_string()
    } else {
        format!("--{field}")
    };
    format!("{option}: {}", e.message())
}

fn new(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("new");
    no_positionals(p, "; new takes only options").map_err(&usage)?;
    let org = p.required_text("--org").map_err(&usage)?;
    let prefix = p.text("--prefix").map_err(&usage)?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    check_prefix(&prefix).map_err(&usage)?;
    let given_id = p.text("--id").map_err(&usage)?;
    if let Some(id) = &given_id {
        if id.len() != 8 || !id.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(usage(format!("--id: expected 8 hex digits, got {id:?}")));
        }
    }
    let given_id = given_id.map(|id| id.to_ascii_lowercase());
    let mut attributes = BTreeMap::new();
    for attr in p.texts("--attr").map_err(&usage)? {
        let Some((name, value)) = attr.split_once('=') else {
            return Err(usage(format!("--attr: expected NAME=VALUE, got {attr:?}")));
        };
        if attributes.insert(name.to_string(), value.to_string()).is_some() {
            return Err(usage(format!("--attr: {name} is given twice")));
        }
    }
    let now = clock::now_ms().map_err(Fail::Error)?;
    let expires_at = match p.text("--expires").map_err(&usage)? {
        Some(text) => Some(Expiry::Text(clock::expires_at(&text, now).map_err(&usage)?)),
        None => None,
    };
    let mut record = RawKey {
        id: String::new(),
        hash: String::new(),
        org,
        name: p.text("--name").map_err(&usage)?,
        scopes: p.texts("--scope").map_err(&usage)?,
        attributes,
        expires_at,
        revoked: false,
    };
    let mut make_key = |id: String| -> Result<String, Fail> {
        let key = format!("{prefix}{id}_{}", random_hex(32)?);
        record.id = id;
        record.hash = hex::encode(hash_key(key.as_bytes()));
        Ok(key)
    };

    let Some(path) = p.os("--keys").map(PathBuf::from) else {
        let key = make_key(match &given_id {
            Some(id) => id.clone(),
            None => random_hex(4)?,
        })?;
        compile_key(&record, "record").map_err(|e| usage(option_of(&e)))?;
        let line = keyset::record_line(&record).map_err(Fail::Error)?;
        emit(&format!("{key}\n")).map_err(|_| Fail::Error("cannot write the key to standard output".into()))?;
        note(&line);
        return Ok(());
    };

    let target = keyset::target(&path);
    let lock = keyset::lock(&target).map_err(Fail::Error)?;
    let existing = keyset::read(&target).map_err(Fail::Error)?;
    let old_keys = existing.as_ref().map(|k| k.keys.as_slice()).unwrap_or_default();
    let taken: HashSet<&str> = old_keys.iter().map(|k| k.id.as_str()).collect();
    let id = match &given_id {
        Some(id) if taken.contains(id.as_str()) => {
            return Err(Fail::Error(format!("{}: already has a key with id {id}", path.display())));
        }
        Some(id) => id.clone(),
        // 2^32 ids: a clash is rare, and then another id does.
        None => loop {
            let id = random_hex(4)?;
            if !taken.contains(id.as_str()) {
                break id;
            }
        },
    };
    let key = make_key(id)?;
    compile_key(&record, "record").map_err(|e| usage(option_of(&e)))?;
    let line = keyset::record_line(&record).map_err(Fail::Error)?;
    let text = match &existing {
        None => keyset::new_file(&line).into_bytes(),
        Some(set) => keyset::with_record_added(&set.text, &line).map_err(|e| edit_failed(&path, &e))?,
    };
    let mut want = keyset::as_values(old_keys);
    want.extend(keyset::as_values(std::slice::from_ref(&record)));
    verify(&path, &text, &want)?;
    keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
    drop(lock);
    emit(&format!("{key}\n")).map_err(|_| {
        Fail::Error(format!(
            "cannot write the key to standard output; it is lost: revoke it with `keygate revoke {} --keys {}`",
            record.id,
            path.display()
        ))
    })?;
    note(&format!("keygate: added key {} (org {}) to {}", record.id, record.org, path.display()));
    Ok(())
}

fn edit_failed(path: &Path, why: &str) -> Fail {
    Fail::Error(format!("{}: cannot change the file in place ({why}); it is left as it is", path.display()))
}

/// Reads back an edited key set before it is written: the filter must accept it, and it must hold
/// exactly the records wanted.
fn verify(path: &Path, text: &[u8], want: &[serde_json::Value]) -> Result<(), Fail> {
    let keys = keyset::parse(text).map_err(|e| edit_failed(path, &e))?;
    if keyset::as_values(&keys) != want {
        return Err(edit_failed(path, "the change did not read back as intended"));
    }
    Ok(())
}

fn revoke(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("revoke");
    let path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let ids: Vec<String> = p
        .positionals
        .iter()
        .map(|a| a.to_str().map(str::to_string).ok_or_else(|| usage("an ID is not valid UTF-8".into())))
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Err(usage("name the ID of the key to revoke".into()));
    }
    let target = keyset::target(&path);
    let lock = keyset::lock(&target).map_err(Fail::Error)?;
    let set = keyset::read_existing(&target).map_err(Fail::Error)?;
    let mut indices = Vec::new();
    for id in &ids {
        let index =
            set.keys.iter().position(|k| &k.id == id).ok_or_else(|| {
                Fail::Error(format!("{}: no key with id {id:?}; nothing was changed", path.display()))
            })?;
        if !indices.contains(&index) {
            indices.push(index);
        }
    }
    let mut text = set.text.clone();
    let mut want = keyset::as_values(&set.keys);
    let mut changed = Vec::new();
    for &i in &indices {
        let Some(record) = set.keys.get(i) else { continue };
        if record.revoked {
            note(&format!("keygate: key {} in {} was already revoked", record.id, path.display()));
            continue;
        }
        text = keyset::with_record_revoked(&text, i).map_err(|e| edit_failed(&path, &e))?;
        if let Some(serde_json::Value::Object(v)) = want.get_mut(i) {
            v.insert("revoked".into(), serde_json::Value::Bool(true));
        }
        changed.push(record.id.as_str());
    }
    if changed.is_empty() {
        return Ok(());
    }
    verify(&path, &text, &want)?;
    keyset::write_atomic(&target, &text, &lock).map_err(Fail::Error)?;
    drop(lock);
    for id in changed {
        note(&format!("keygate: revoked key {id} in {}", path.display()));
    }
    Ok(())
}

fn list(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("list");
    no_positionals(p, "; list takes only options").map_err(&usage)?;
    let path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let prefix = p.text("--prefix").map_err(&usage)?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    check_prefix(&prefix).map_err(&usage)?;
    let set = keyset::read_existing(&path).map_err(Fail::Error)?;
    let now = clock::now_ms().map_err(Fail::Error)?;
    let mut rows: Vec<[String; 7]> =
        vec![["ID", "KEY", "ORG", "NAME", "SCOPES", "EXPIRES", "STATUS"].map(String::from)];
    for (i, record) in set.keys.iter().enumerate() {
        let (_, key) = compile_key(record, &format!("keys[{i}]")).map_err(|e| Fail::Error(e.to_string()))?;
        let status = if key.revoked {
            "revoked"
        } else if key.expired_at(now) {
            "expired"
        } else {
            "active"
        };
        let or_dash = |s: String| if s.is_empty() { "-".to_string() } else { s };
        rows.push([
            key.id.clone(),
            format!("{prefix}{}_…", key.id),
            key.org.clone(),
            or_dash(key.name.clone().unwrap_or_default()),
            or_dash(key.scopes.join(" ")),
            key.expires_at_ms.map_or_else(|| "never".to_string(), clock::format_rfc3339),
            status.to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            line.push_str(&" ".repeat(w.saturating_sub(cell.chars().count())));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    emit(&out)
}

/// The longest key the filter can be configured to accept (`credential.max_length`).
const MAX_KEY: usize = 8192;

fn hash(p: &Parsed) -> Result<(), Fail> {
    // The argument is probably a key: it is not repeated in the message.
    if !p.positionals.is_empty() {
        return Err(usage("hash")(
            "takes no arguments: the key is read from standard input, never from the command line, where other users can see it"
                .into(),
        ));
    }
    let stdin = std::io::stdin();
    let mut input = Vec::new();
    let read = if stdin.is_terminal() {
        note("keygate: paste the key, then press Enter:");
        let mut line = String::new();
        stdin.lock().read_line(&mut line).map(|_| input = line.into_bytes())
    } else {
        stdin.lock().take(MAX_KEY as u64 + 3).read_to_end(&mut input).map(|_| ())
    };
    read.map_err(|e| Fail::Error(format!("cannot read standard input: {}", keyset::io_reason(&e))))?;
    let key = input.strip_suffix(b"\n").map_or(input.as_slice(), |k| k.strip_suffix(b"\r").unwrap_or(k));
    if key.is_empty() {
        return Err(Fail::Error("no key on standard input".into()));
    }
    if key.len() > MAX_KEY {
        return Err(Fail::Error(format!(
            "standard input holds more than {MAX_KEY} characters, longer than any key the filter accepts"
        )));
    }
    if !key.iter().all(u8::is_ascii_graphic) {
        return Err(Fail::Error(
            "standard input holds more than one line, or a character no key has (a space, a control character, non-ASCII): the filter would never accept it".into(),
        ));
    }
    emit(&format!("{}\n", hex::encode(hash_key(key))))
}

fn check(p: &Parsed) -> Result<(), Fail> {
    if p.positionals.is_empty() {
        return Err(usage("check")("name a FILE to check (- for standard input)".into()));
    }
    let envoy = p.flag("--envoy");
    let mut clean = true;
    for file in &p.positionals {
        let label = file.to_string_lossy().into_owned();
        let read = if file == "-" {
            let mut text = Vec::new();
            std::io::stdin().lock().read_to_end(&mut text).map(|_| text)
        } else {
            std::fs::read(file)
        };
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                note(&format!("keygate: {label}: cannot read: {}", keyset::io_reason(&e)));
                clean = false;
                continue;
            }
        };
        let mut report = Vec::new();
        let ok = if envoy {
            check::report_envoy(&label, &text, &mut report)
        } else {
            check::report_json(&label, &text, &mut report)
        };
        clean &= ok.unwrap_or(false);
        emit(&String::from_utf8_lossy(&report))?;
    }
    if clean {
        Ok(())
    } else {
        Err(Fail::Quiet(1))
    }
}

/// The members of a plugin configuration, in the order the filter documents them.
const CONFIG_FIELDS: [&str; 8] =
    ["credential", "keys", "key_set", "routes", "unmatched", "scope_implies", "upstream", "errors"];

fn config(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("config");
    no_positionals(p, "; config takes only options").map_err(&usage)?;
    let keys_path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    if let Some(dir) = p.os("--shards").map(PathBuf::from) {
        if p.os("--routes").is_some() || p.os("--envoy").is_some() {
            return Err(usage("--shards writes only the key set: leave out --routes and --envoy".into()));
        }
        let digits = match p.text("--digits").map_err(&usage)? {
            None => 1,
            Some(d) => {
                d.parse::<usize>().ok().filter(|d| *d <= 4).ok_or_else(|| usage("--digits: from 0 to 4".into()))?
            }
        };
        let version = match p.text("--manifest-version").map_err(&usage)? {
            Some(v) => v,
            None => (clock::now_ms().map_err(Fail::Error)? / 1_000).to_string(),
        };
        let set = keyset::read_existing(&keys_path).map_err(Fail::Error)?;
        let done = shards::publish(&set.text, &dir, digits, &version).map_err(Fail::Error)?;
        note(&format!(
            "keygate: wrote {} (version {version}) and {} shard{} holding {} key{}",
            dir.join("manifest.json").display(),
            done.shards,
            if done.shards == 1 { "" } else { "s" },
            done.keys,
            if done.keys == 1 { "" } else { "s" },
        ));
        return Ok(());
    }
    for only_with_shards in ["--digits", "--manifest-version"] {
        if p.os(only_with_shards).is_some() {
            return Err(usage(format!("{only_with_shards} goes with --shards")));
        }
    }
    let set = keyset::read_existing(&keys_path).map_err(Fail::Error)?;
    let keys_raw = member_texts(&set.text)
        .map_err(Fail::Error)?
        .into_iter()
        .find(|(name, _)| name == "keys")
        .map_or_else(|| "[]".to_string(), |(_, raw)| raw);

    // The Envoy file whose keygate configuration is replaced, if any.
    let envoy = match p.os("--envoy").map(PathBuf::from) {
        None => None,
        Some(path) => {
            let shown = path.display().to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| Fail::Error(format!("{shown}: cannot read: {}", keyset::io_reason(&e))))?;
            let mut scan = envoy::scan(&text).map_err(|(line, e)| Fail::Error(format!("{shown}:{line}: {e}")))?;
            if scan.found.len() != 1 {
                return Err(Fail::Error(format!(
                    "{shown}: expected one keygate filter with its configuration inline, found {}",
                    scan.found.len()
                )));
            }
            let found = scan.found.remove(0);
            Some((shown, text, found))
        }
    };

    let mut members: Vec<(String, String)> = Vec::new();
    if let Some(routes_path) = p.os("--routes").map(PathBuf::from) {
        let shown = routes_path.display();
        let text = std::fs::read(&routes_path)
            .map_err(|e| Fail::Error(format!("{shown}: cannot read: {}", keyset::io_reason(&e))))?;
        Plugin::from_json(&text)
            .map_err(|e| Fail::Error(format!("{shown}: {e} (`keygate check {shown}` lists every problem)")))?;
        members = member_texts(&text).map_err(Fail::Error)?;
        if members.iter().any(|(name, _)| name == "keys") {
            return Err(Fail::Error(format!(
                "{shown}: keys: the keys come from --keys {}; leave them out of this file",
                keys_path.display()
            )));
        }
    } else if let Some((shown, _, found)) = &envoy {
        // Everything but the keys stays as the Envoy file has it.
        Plugin::from_json(found.json.as_bytes()).map_err(|e| {
            Fail::Error(format!(
                "{shown}:{}: {} (`keygate check --envoy {shown}` lists every problem)",
                found.line_of(&e.first().field),
                e
            ))
        })?;
        members = member_texts(found.json.as_bytes()).map_err(Fail::Error)?;
        members.retain(|(name, _)| name != "keys");
    }
    members.push(("keys".into(), keys_raw));
    members.sort_by_key(|(name, _)| CONFIG_FIELDS.iter().position(|f| f == name).unwrap_or(usize::MAX));
    let body: Vec<String> =
        members.iter().map(|(name, raw)| format!("{}:{raw}", serde_json::Value::String(name.clone()))).collect();
    let compact = format!("{{{}}}", body.join(","));
    let out = json::pretty(compact.as_bytes()).map_err(Fail::Error)?;
    Plugin::from_json(out.as_bytes()).map_err(|e| Fail::Error(format!("the configuration made is not valid: {e}")))?;
    if set.keys.is_empty() {
        note(&format!(
            "keygate: {} holds no keys: the filter will refuse every request that needs one",
            keys_path.display()
        ));
    }
    match envoy {
        None => emit(&out),
        Some((shown, text, found)) => {
            let replaced =
                envoy::replace_block(&text, &found, &out).map_err(|e| Fail::Error(format!("{shown}: {e}")))?;
            emit(&replaced)
        }
    }
}

/// Each top-level member of a JSON object: its name and its value's text as written.
fn member_texts(text: &[u8]) -> Result<Vec<(String, String)>, String> {
    let top = json::value_at(text, 0)?;
    let (members, _) = json::members(text, top.start)?;
    members
        .into_iter()
        .map(|m| {
            let raw =
                text.get(m.value.start..m.value.end).and_then(|b| std::str::from_utf8(b).ok()).ok_or("not UTF-8")?;
            Ok((m.name, raw.to_string()))
        })
        .collect()
}
