//! A tally's compact bytes, for a host that merges its workers' tallies through shared data
//! ([`crate::usage::shared`]): [`encode`] writes them, [`decode`] reads them back, refusing
//! anything [`encode`] cannot write and never reading past the input or past its bound.
//!
//! The layout, every number an unsigned LEB128 varint:
//!
//! ```text
//! 'U' 1                         tag and version
//! dropped
//! kinds [count]…                the unattributed refusals: a bit mask of the kinds (bit i for
//!                               DenyKind::ALL[i]), then one count for each bit set, in order
//! entries
//! entries × { id length, id bytes, allowed, last used (Unix seconds), kinds [count]… }
//! ```
//!
//! The coarse clock and the bound are not written: the reader has its own.

use crate::reply::DenyKind;
use crate::usage::tally::{DenyCounts, KeyUsage, Tally};
use std::fmt;

const TAG: [u8; 2] = [b'U', 1];

/// Why bytes are not a tally, and at which byte reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeError {
    pub at: usize,
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "usage tally: {} at byte {}", self.reason, self.at)
    }
}

impl std::error::Error for DecodeError {}

/// The bytes of `tally`.
pub fn encode(tally: &Tally) -> Vec<u8> {
    let ids: usize = tally.keys().map(|(id, _)| id.len()).sum();
    let mut out = Vec::with_capacity(16 + ids + tally.len() * 12);
    out.extend_from_slice(&TAG);
    put(&mut out, tally.dropped());
    put_counts(&mut out, tally.unattributed());
    put(&mut out, tally.len() as u64);
    for (id, usage) in tally.keys() {
        put(&mut out, id.len() as u64);
        out.extend_from_slice(id.as_bytes());
        put(&mut out, usage.allowed);
        put(&mut out, u64::try_from(usage.last_used_s).unwrap_or(0));
        put_counts(&mut out, &usage.denied);
    }
    out
}

/// The tally in `bytes`, holding at most `max_keys` ids, its clock at `now_s`. Entries past the
/// bound are counted as dropped requests, as [`Tally::merge`] counts them. An empty input is an
/// empty tally (what a host writes to empty a shared entry).
pub fn decode(bytes: &[u8], max_keys: usize, now_s: i64) -> Result<Tally, DecodeError> {
    let mut tally = Tally::new(max_keys, now_s);
    if bytes.is_empty() {
        return Ok(tally);
    }
    let mut r = Reader { bytes, at: 0 };
    if r.take(TAG.len())? != TAG {
        return Err(r.error("not a keygate usage tally (version 1)"));
    }
    tally.add_dropped(r.number()?);
    tally.add_unattributed(&r.counts()?);
    let entries = r.number()?;
    for _ in 0..entries {
        let len = usize::try_from(r.number()?).map_err(|_| r.error("an id longer than the input"))?;
        let id = r.take(len)?;
        if id.is_empty() || !id.iter().all(u8::is_ascii_graphic) {
            return Err(r.error("a key id that is not visible ASCII"));
        }
        let id = String::from_utf8(id.to_vec()).map_err(|_| r.error("a key id that is not visible ASCII"))?;
        let allowed = r.number()?;
        let last_used_s =
            i64::try_from(r.number()?).map_err(|_| r.error("a last-used time past the range of a clock"))?;
        let denied = r.counts()?;
        if tally.get(&id).is_some() {
            return Err(r.error("a key id listed twice"));
        }
        tally.insert(id, KeyUsage { allowed, denied, last_used_s });
    }
    if r.at != bytes.len() {
        return Err(r.error("bytes after the last entry"));
    }
    Ok(tally)
}

fn put(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put_counts(out: &mut Vec<u8>, counts: &DenyCounts) {
    let mask = counts.iter().fold(0u64, |mask, (kind, _)| mask | 1 << kind.index());
    put(out, mask);
    for (_, n) in counts.iter() {
        put(out, n);
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn error(&self, reason: &'static str) -> DecodeError {
        DecodeError { at: self.at, reason }
    }

    fn take(&mut self, len: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.at.checked_add(len).filter(|end| *end <= self.bytes.len());
        let taken = end.and_then(|end| self.bytes.get(self.at..end)).ok_or_else(|| self.error("truncated"))?;
        self.at += len;
        Ok(taken)
    }

    fn number(&mut self) -> Result<u64, DecodeError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.take(1)?.first().ok_or_else(|| self.error("truncated"))?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(self.error("a number past 64 bits"));
            }
            n |= bits << shift;
            if byte & 0x80 == 0 {
                if byte == 0 && shift > 0 {
                    return Err(self.error("a number not in its shortest form"));
                }
                return Ok(n);
            }
        }
        Err(self.error("a number past 64 bits"))
    }

    fn counts(&mut self) -> Result<DenyCounts, DecodeError> {
        let mask = self.number()?;
        if mask >> DenyKind::ALL.len() != 0 {
            return Err(self.error("an unknown deny kind"));
        }
        let mut counts = DenyCounts::default();
        for kind in DenyKind::ALL.into_iter().filter(|k| mask & 1 << k.index() != 0) {
            let n = self.number()?;
            if n == 0 {
                return Err(self.error("a count of zero"));
            }
            counts.add(kind, n);
        }
        Ok(counts)
    }
}
