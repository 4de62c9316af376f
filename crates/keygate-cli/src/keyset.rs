//! Key-set files (`{"keys": [records]}`): read and checked with the filter's own rules, changed in
//! place (every byte outside the change kept), written atomically under a lock.
//!
//! A writer takes an exclusive `flock` on `FILE.lock` (created beside the file and left there) for
//! the whole read-change-write, writes `FILE.keygate-tmp`, flushes it to disk and renames it over
//! `FILE`. A reader therefore sees the old file or the new one, never a mix, and two writers take
//! turns. A temporary file left by a writer that was killed is stale (its writer no longer holds
//! the lock) and is overwritten by the next writer; the key-set file itself is untouched by it.

use crate::json;
use keygate_core::json::parse_json;
use keygate_core::keys::record::{compile_keys, RawKey};
use serde::Deserialize;
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

/// The whole of a key-set file: only `keys`, so that a file is also a plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeySetFile {
    #[serde(default)]
    keys: Vec<RawKey>,
}

/// A key-set file as read: its bytes and its records.
#[derive(Debug)]
pub struct KeySet {
    pub text: Vec<u8>,
    pub keys: Vec<RawKey>,
}

/// Checks key-set text with the filter's rules; the error is `field: message`.
pub fn parse(text: &[u8]) -> Result<Vec<RawKey>, String> {
    let file: KeySetFile = parse_json(text).map_err(|e| e.to_string())?;
    compile_keys(&file.keys, "keys").map_err(|e| e.to_string())?;
    Ok(file.keys)
}

/// Reads and checks a key-set file; `Ok(None)` if it does not exist.
pub fn read(path: &Path) -> Result<Option<KeySet>, String> {
    let text = match fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: cannot read: {}", path.display(), io_reason(&e))),
    };
    let keys = parse(&text).map_err(|e| {
        format!("{}: {e} (the file is left as it is; `keygate check` lists every problem)", path.display())
    })?;
    Ok(Some(KeySet { text, keys }))
}

/// Reads a key-set file that must exist.
pub fn read_existing(path: &Path) -> Result<KeySet, String> {
    read(path)?.ok_or_else(|| format!("{}: no such file", path.display()))
}

/// The OS error without Rust's ` (os error 2)` suffix.
pub fn io_reason(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text.get(..at).unwrap_or(&text).to_string(),
        None => text,
    }
}

/// The file a write goes to: a symbolic link is followed, so that the link stays a link.
pub fn target(path: &Path) -> PathBuf {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()),
        _ => path.to_path_buf(),
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// An exclusive lock on `FILE.lock`, released when dropped (or when the process dies).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

pub fn lock(path: &Path) -> Result<Lock, String> {
    let lock_path = sibling(path, ".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| format!("{}: cannot create the lock file: {}", lock_path.display(), io_reason(&e)))?;
    flock(&file, &lock_path)?;
    Ok(Lock { _file: file })
}

/// The lock of [`lock`] if no one else holds it, else `Ok(None)` at once.
pub fn try_lock(path: &Path) -> Result<Option<Lock>, String> {
    let lock_path = sibling(path, ".lock");
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&lock_path)
        .map_err(|e| format!("{}: cannot create the lock file: {}", lock_path.display(), io_reason(&e)))?;
    Ok(try_flock(&file, &lock_path)?.then_some(Lock { _file: file }))
}

#[cfg(unix)]
fn try_flock(file: &File, lock_path: &Path) -> Result<bool, String> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock takes a file descriptor and flags; `fd` is open for as long as `file` lives.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(format!("{}: cannot lock: {}", lock_path.display(), io_reason(&e))),
    }
}

#[cfg(not(unix))]
fn try_flock(_file: &File, lock_path: &Path) -> Result<bool, String> {
    Err(format!("{}: file locking is only implemented on Unix", lock_path.display()))
}

#[cfg(unix)]
fn flock(file: &File, lock_path: &Path) -> Result<(), String> {
    use std::os::unix::io::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: flock takes a file descriptor and flags; `fd` is open for as long as `file` lives.
    let try_lock = |flags| unsafe { libc::flock(fd, flags) };
    if try_lock(libc::LOCK_EX | libc::LOCK_NB) == 0 {
        return Ok(());
    }
    let busy = std::io::Error::last_os_error();
    if busy.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(format!("{}: cannot lock: {}", lock_path.display(), io_reason(&busy)));
    }
    eprintln!("keygate: waiting for {} (another keygate is changing the file)", lock_path.display());
    loop {
        if try_lock(libc::LOCK_EX) == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != ErrorKind::Interrupted {
            return Err(format!("{}: cannot lock: {}", lock_path.display(), io_reason(&e)));
        }
    }
}

#[cfg(not(unix))]
fn flock(_file: &File, lock_path: &Path) -> Result<(), String> {
    Err(format!("{}: file locking is only implemented on Unix", lock_path.display()))
}

/// Replaces `path` with `contents` atomically: a temporary file beside it, flushed to disk, then
/// renamed over it. The caller holds the [`Lock`]. A new file gets the default permissions; a
/// replaced one keeps its own.
pub fn write_atomic(path: &Path, contents: &[u8], _lock: &Lock) -> Result<(), String> {
    let tmp = sibling(path, ".keygate-tmp");
    let failed = |what: &str, e: &std::io::Error| format!("{}: cannot {what}: {}", path.display(), io_reason(e));
    let written = (|| -> std::io::Result<()> {
        let mut file = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        if let Ok(meta) = fs::metadata(path) {
            file.set_permissions(meta.permissions())?;
        }
        file.write_all(contents)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(failed("write", &e));
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(failed("replace", &e));
    }
    // The rename itself is durable once the directory is flushed; where a directory cannot be
    // opened for that (not Unix), the rename is still atomic.
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// A key record on one line, fields in the filter's order.
pub fn record_line(record: &RawKey) -> Result<String, String> {
    let compact = serde_json::to_vec(record).map_err(|e| e.to_string())?;
    json::inline(&compact)
}

/// A new key-set file holding one record.
pub fn new_file(record: &str) -> String {
    format!("{{\n  \"keys\": [\n    {record}\n  ]\n}}\n")
}

fn keys_member(text: &[u8]) -> Result<(json::Span, Option<json::Member>), String> {
    let top = json::value_at(text, 0)?;
    let (members, _) = json::members(text, top.start)?;
    Ok((top, members.into_iter().find(|m| m.name == "keys")))
}

/// `text` with `record` (one line of JSON) added at the end of `keys`.
pub fn with_record_added(text: &[u8], record: &str) -> Result<Vec<u8>, String> {
    let nl = json::newline_of(text);
    let (top, keys) = keys_member(text)?;
    let (at, end, insert) = match keys {
        None => {
            // `{}`: the only member a key-set file may have is `keys`.
            let end = top.end.saturating_sub(1);
            (top.start + 1, end, format!("{nl}  \"keys\": [{nl}    {record}{nl}  ]{nl}"))
        }
        Some(m) => {
            let (elements, array_end) = json::elements(text, m.value.start)?;
            match elements.last() {
                None => {
                    let indent = json::indent_before(text, m.name_start).unwrap_or("");
                    (m.value.start + 1, array_end - 1, format!("{nl}{indent}  {record}{nl}{indent}"))
                }
                Some(last) => match json::indent_before(text, last.start) {
                    Some(indent) => (last.end, last.end, format!(",{nl}{indent}{record}")),
                    None => (last.end, last.end, format!(", {record}")),
                },
            }
        }
    };
    splice(text, at, end, &insert)
}

/// `text` with record `index` of `keys` marked `"revoked": true`.
pub fn with_record_revoked(text: &[u8], index: usize) -> Result<Vec<u8>, String> {
    let nl = json::newline_of(text);
    let (_, keys) = keys_member(text)?;
    let keys = keys.ok_or("no keys")?;
    let (elements, _) = json::elements(text, keys.value.start)?;
    let record = elements.get(index).ok_or("no such record")?;
    let (members, _) = json::members(text, record.start)?;
    if let Some(revoked) = members.iter().find(|m| m.name == "revoked") {
        return splice(text, revoked.value.start, revoked.value.end, "true");
    }
    let last = members.last().ok_or("an empty record")?;
    let insert = match json::indent_before(text, last.name_start) {
        Some(indent) => format!(",{nl}{indent}\"revoked\": true"),
        None => ", \"revoked\": true".to_string(),
    };
    splice(text, last.value.end, last.value.end, &insert)
}

fn splice(text: &[u8], from: usize, to: usize, insert: &str) -> Result<Vec<u8>, String> {
    let (head, tail) = (text.get(..from).ok_or("bad span")?, text.get(to..).ok_or("bad span")?);
    let mut out = Vec::with_capacity(text.len() + insert.len());
    out.extend_from_slice(head);
    out.extend_from_slice(insert.as_bytes());
    out.extend_from_slice(tail);
    Ok(out)
}

/// The records as JSON values, for comparing a file before and after a change.
pub fn as_values(keys: &[RawKey]) -> Vec<serde_json::Value> {
    keys.iter().map(|k| serde_json::to_value(k).unwrap_or_default()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "0000000000000000000000000000000000000000000000000000000000000000";
    const REC: &str =
        r#"{"id": "n", "hash": "1111111111111111111111111111111111111111111111111111111111111111", "org": "o"}"#;

    fn rec(id: &str) -> String {
        format!(r#"{{"id": "{id}", "hash": "{H}", "org": "o"}}"#)
    }

    #[test]
    fn adding_keeps_every_other_byte_and_the_layout() {
        let cases = [
            (
                format!("{{\n  \"keys\": [\n    {}\n  ]\n}}\n", rec("a")),
                format!("{{\n  \"keys\": [\n    {},\n    {REC}\n  ]\n}}\n", rec("a")),
            ),
            (format!("{{\"keys\":[{}]}}", rec("a")), format!("{{\"keys\":[{}, {REC}]}}", rec("a"))),
            ("{\"keys\": []}".to_string(), format!("{{\"keys\": [\n  {REC}\n]}}")),
            ("{}".to_string(), format!("{{\n  \"keys\": [\n    {REC}\n  ]\n}}")),
            (
                format!("{{\r\n  \"keys\": [\r\n    {}\r\n  ]\r\n}}", rec("a")),
                format!("{{\r\n  \"keys\": [\r\n    {},\r\n    {REC}\r\n  ]\r\n}}", rec("a")),
            ),
        ];
        for (before, want) in cases {
            let after = String::from_utf8(with_record_added(before.as_bytes(), REC).unwrap()).unwrap();
            assert_eq!(after, want);
            assert_eq!(parse(after.as_bytes()).unwrap().last().unwrap().id, "n");
        }
    }

    #[test]
    fn revoking_flips_or_adds_the_flag_in_that_record_only() {
        let before = format!(
            "{{\"keys\": [\n  {},\n  {{\"id\": \"b\", \"hash\": \"{}\", \"org\": \"o\", \"revoked\": false}}\n]}}",
            rec("a"),
            "1".repeat(64)
        );
        let after = String::from_utf8(with_record_revoked(before.as_bytes(), 0).unwrap()).unwrap();
        assert_eq!(after, before.replacen(r#""org": "o"}"#, r#""org": "o", "revoked": true}"#, 1));
        let after = String::from_utf8(with_record_revoked(before.as_bytes(), 1).unwrap()).unwrap();
        assert_eq!(after, before.replace("false", "true"));
        let pretty =
            format!("{{\"keys\": [\n  {{\n    \"id\": \"a\",\n    \"hash\": \"{H}\",\n    \"org\": \"o\"\n  }}\n]}}");
        let after = String::from_utf8(with_record_revoked(pretty.as_bytes(), 0).unwrap()).unwrap();
        assert_eq!(after, pretty.replace("\"org\": \"o\"", "\"org\": \"o\",\n    \"revoked\": true"));
    }

    #[test]
    fn a_key_set_file_holds_only_keys() {
        assert_eq!(
            parse(b"{\"keys\": [], \"routes\": []}").unwrap_err(),
            "routes: unknown field `routes`, expected `keys` at line 1 column 21"
        );
        assert!(parse(b"{\"keys\": [").is_err());
        assert!(parse(b"").is_err());
    }
}
