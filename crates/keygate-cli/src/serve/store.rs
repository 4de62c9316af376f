//! The usage reports `keygate serve` has accepted: `<usage-dir>/usage.jsonl`, one report per line,
//! and the `batch_id`s it holds, so that a report sent again (a retry, a restart of its sender)
//! is stored once.
//!
//! A report is stored before it is answered: its line is appended in one write and flushed to
//! disk (`fdatasync`). A write that fails is cut back off the file, so the file only ever holds
//! whole lines, but for a last line a crash cut short; that line was never answered (its sender
//! sends it again), and opening the file cuts it off. At start the seen ids are read back from the
//! file. One `keygate serve` at a time keeps a directory: it holds `usage.jsonl.lock`.

use crate::keyset::{self, io_reason, Lock};
use crate::report;
use keygate_core::usage::Report;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The file of reports in a usage directory.
pub const USAGE_FILE: &str = "usage.jsonl";

/// What became of a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Stored {
    Accepted,
    /// Its `batch_id` was stored before; nothing was written.
    Duplicate,
}

#[derive(Debug)]
pub struct UsageStore {
    path: PathBuf,
    file: File,
    /// The file's length: where the next line goes, and what a failed write is cut back to.
    len: u64,
    seen: HashSet<String>,
    _lock: Lock,
}

impl UsageStore {
    /// Opens (or creates) `dir/usage.jsonl` and reads back the ids it holds.
    pub fn open(dir: &Path) -> Result<UsageStore, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: cannot create: {}", dir.display(), io_reason(&e)))?;
        let path = dir.join(USAGE_FILE);
        let shown = path.display().to_string();
        let lock = keyset::try_lock(&path)?
            .ok_or_else(|| format!("{shown}: another keygate serve keeps this directory (it holds {shown}.lock)"))?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .open(&path)
            .map_err(|e| format!("{shown}: cannot open: {}", io_reason(&e)))?;
        let mut text = Vec::new();
        file.read_to_end(&mut text).map_err(|e| format!("{shown}: cannot read: {}", io_reason(&e)))?;
        let whole = text.iter().rposition(|&c| c == b'\n').map_or(0, |i| i + 1);
        if whole < text.len() {
            // A report cut short by a crash: never answered, so its sender sends it again.
            file.set_len(whole as u64)
                .map_err(|e| format!("{shown}: cannot cut off a torn last line: {}", io_reason(&e)))?;
            eprintln!("keygate serve: {shown}: cut off a torn last line ({} bytes)", text.len() - whole);
        }
        let mut seen = HashSet::new();
        for (i, line) in report::complete_lines(&text).enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let stored = report::parse(line).map_err(|e| format!("{shown}:{}: not a usage report: {e}", i + 1))?;
            seen.insert(stored.batch_id);
        }
        Ok(UsageStore { path, file, len: whole as u64, seen, _lock: lock })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many reports the file holds.
    pub fn reports(&self) -> usize {
        self.seen.len()
    }

    /// Stores `report` unless its `batch_id` was stored before.
    pub fn store(&mut self, report: &Report) -> Result<Stored, String> {
        if self.seen.contains(&report.batch_id) {
            return Ok(Stored::Duplicate);
        }
        // The report as the filter writes it: one line, the same member order whoever sent it.
        let mut line = report.to_json();
        line.push(b'\n');
        let written = self.file.write_all(&line).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // Whatever part of the line reached the file goes again, so it holds whole lines only.
            let _ = self.file.set_len(self.len);
            return Err(format!("{}: cannot write: {}", self.path.display(), io_reason(&e)));
        }
        self.len += line.len() as u64;
        self.seen.insert(report.batch_id.clone());
        Ok(Stored::Accepted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keygate-store-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn report(batch: &str) -> Report {
        let text = format!(
            r#"{{"batch_id": "{batch}", "node": "n", "from": "2026-12-03T14:00:00Z", "to": "2026-12-03T14:00:10Z",
                "keys": {{"k1": {{"allowed": 2, "denied": {{}}, "last_used": "2026-12-03T14:00:09Z"}}}}, "unattributed": {{}}, "dropped": 0}}"#
        );
        report::parse(text.as_bytes()).unwrap()
    }

    #[test]
    fn a_batch_is_stored_once_also_after_a_restart() {
        let d = dir("once");
        let mut store = UsageStore::open(&d).unwrap();
        assert_eq!(store.store(&report("a")).unwrap(), Stored::Accepted);
        assert_eq!(store.store(&report("a")).unwrap(), Stored::Duplicate);
        assert_eq!(store.store(&report("b")).unwrap(), Stored::Accepted);
        drop(store);
        let mut store = UsageStore::open(&d).unwrap();
        assert_eq!(store.reports(), 2);
        assert_eq!(store.store(&report("a")).unwrap(), Stored::Duplicate);
        let text = fs::read_to_string(d.join(USAGE_FILE)).unwrap();
        assert_eq!(text.lines().count(), 2);
        assert_eq!(report::parse(text.lines().next().unwrap().as_bytes()).unwrap(), report("a"));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_last_line_is_cut_off_and_a_corrupt_line_refuses_to_start() {
        let d = dir("torn");
        let mut store = UsageStore::open(&d).unwrap();
        store.store(&report("a")).unwrap();
        drop(store);
        let path = d.join(USAGE_FILE);
        let good = fs::read(&path).unwrap();
        fs::write(&path, [good.as_slice(), b"{\"batch_id\": \"b\", \"no"].concat()).unwrap();
        let mut store = UsageStore::open(&d).unwrap();
        assert_eq!(fs::read(&path).unwrap(), good);
        assert_eq!(store.store(&report("b")).unwrap(), Stored::Accepted);
        drop(store);
        fs::write(&path, [good.as_slice(), b"garbage\n"].concat()).unwrap();
        let e = UsageStore::open(&d).unwrap_err();
        assert!(e.ends_with("usage.jsonl:2: not a usage report: expected a JSON object"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn one_server_at_a_time_keeps_a_directory() {
        let d = dir("lock");
        let _store = UsageStore::open(&d).unwrap();
        let e = UsageStore::open(&d).unwrap_err();
        assert!(e.contains("another keygate serve keeps this directory"), "{e}");
        let _ = fs::remove_dir_all(&d);
    }
}
