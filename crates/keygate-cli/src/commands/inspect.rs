//! `keygate list`, `keygate hash` and `keygate check`: the commands that read and report, and
//! change nothing.

use super::{check_prefix, emit, no_positionals, note, usage, Fail, DEFAULT_PREFIX};
use crate::args::Parsed;
use crate::report::Usage;
use crate::{check, clock, keyset, serve};
use keygate_core::keys::hash_key;
use keygate_core::keys::record::compile_key;
use std::io::{BufRead, IsTerminal, Read};
use std::path::{Path, PathBuf};

/// The usage reports `--usage` names: a file of reports, or the directory `keygate serve` keeps.
fn read_usage(path: &Path) -> Result<Usage, Fail> {
    let file = if path.is_dir() { path.join(serve::USAGE_FILE) } else { path.to_path_buf() };
    let text = match std::fs::read(&file) {
        Ok(text) => text,
        // A directory serve has not written a report into yet.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.is_dir() => Vec::new(),
        Err(e) => return Err(Fail::Error(format!("{}: cannot read: {}", file.display(), keyset::io_reason(&e)))),
    };
    Usage::read(&text).map_err(|(line, e)| Fail::Error(format!("{}:{line}: not a usage report: {e}", file.display())))
}

pub(super) fn list(p: &Parsed) -> Result<(), Fail> {
    let usage = usage("list");
    no_positionals(p, "; list takes only options").map_err(&usage)?;
    let path = PathBuf::from(p.required_os("--keys").map_err(&usage)?);
    let prefix = p.text("--prefix").map_err(&usage)?.unwrap_or_else(|| DEFAULT_PREFIX.to_string());
    check_prefix(&prefix).map_err(&usage)?;
    let set = keyset::read_existing(&path).map_err(Fail::Error)?;
    let used = p.os("--usage").map(|u| read_usage(Path::new(u))).transpose()?;
    let now = clock::now_ms().map_err(Fail::Error)?;
    const COLUMNS: usize = 10;
    let mut rows: Vec<[String; COLUMNS]> =
        vec![["ID", "NAME", "PREVIEW", "ORG", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "REQUESTS", "STATUS"]
            .map(String::from)];
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
        // Checked by compile_key.
        let created = record.created_at.as_deref().and_then(|t| keygate_core::time::parse_rfc3339(t).ok());
        let (last_used, requests) = match &used {
            None => ("-".to_string(), "-".to_string()),
            Some(used) => {
                let totals = used.keys.get(&key.id).cloned().unwrap_or_default();
                (
                    totals.last_used_ms.map_or_else(|| "never".to_string(), clock::format_rfc3339),
                    totals.requests.to_string(),
                )
            }
        };
        rows.push([
            key.id.clone(),
            or_dash(key.name.clone().unwrap_or_default()),
            record.preview.clone().unwrap_or_else(|| format!("{prefix}{}_…", key.id)),
            key.org.clone(),
            or_dash(key.scopes.join(" ")),
            created.map_or_else(|| "-".to_string(), clock::format_rfc3339),
            key.expires_at_ms.map_or_else(|| "never".to_string(), clock::format_rfc3339),
            last_used,
            requests,
            status.to_string(),
        ]);
    }
    let mut widths = [0usize; COLUMNS];
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

pub(super) fn hash(p: &Parsed) -> Result<(), Fail> {
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

pub(super) fn check(p: &Parsed) -> Result<(), Fail> {
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
