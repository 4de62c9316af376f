//! A key record as a host's shared store keeps it: length-prefixed fields, decoded by a request with
//! no JSON work, and the tombstone that stands where a removed key's record was.

use super::Key;

/// Stands where a removed key's record was.
pub const TOMBSTONE: &[u8] = b"-";
const RECORD_MAGIC: u8 = 0x4c; // 'L': layout 2 (varint lengths)

/// Encodes a key record compactly (length-prefixed fields), so a request decodes its record with no
/// JSON work.
pub fn encode_key(key: &Key) -> Vec<u8> {
    let mut out = Vec::with_capacity(64);
    out.push(RECORD_MAGIC);
    put(&mut out, &key.id);
    put(&mut out, &key.org);
    put(&mut out, key.name.as_deref().unwrap_or_default());
    put_len(&mut out, key.scopes.len());
    for s in &key.scopes {
        put(&mut out, s);
    }
    put_len(&mut out, key.attributes.len());
    for (k, v) in &key.attributes {
        put(&mut out, k);
        put(&mut out, v);
    }
    out.push(u8::from(key.revoked) | (u8::from(key.expires_at_ms.is_some()) << 1));
    if let Some(at) = key.expires_at_ms {
        out.extend_from_slice(&at.to_le_bytes());
    }
    out
}

/// Decodes a stored record; `None` for a tombstone or anything malformed.
pub fn decode_key(bytes: &[u8]) -> Option<Key> {
    let (&magic, mut rest) = bytes.split_first()?;
    if magic != RECORD_MAGIC {
        return None;
    }
    let id = take(&mut rest)?;
    let org = take(&mut rest)?;
    let name = take(&mut rest)?;
    let scopes = (0..take_len(&mut rest)?).map(|_| take(&mut rest)).collect::<Option<Vec<_>>>()?;
    let attributes =
        (0..take_len(&mut rest)?).map(|_| Some((take(&mut rest)?, take(&mut rest)?))).collect::<Option<Vec<_>>>()?;
    let (&flags, tail) = rest.split_first()?;
    let expires_at_ms = if flags & 2 != 0 { Some(i64::from_le_bytes(tail.get(..8)?.try_into().ok()?)) } else { None };
    Some(Key {
        id,
        org,
        name: (!name.is_empty()).then_some(name),
        scopes,
        attributes,
        expires_at_ms,
        revoked: flags & 1 != 0,
    })
}

/// Lengths are LEB128 varints: one byte for anything under 128.
fn put_len(out: &mut Vec<u8>, mut n: usize) {
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn put(out: &mut Vec<u8>, s: &str) {
    put_len(out, s.len());
    out.extend_from_slice(s.as_bytes());
}

fn take_len(rest: &mut &[u8]) -> Option<usize> {
    let mut n: usize = 0;
    for shift in (0..35).step_by(7) {
        let (&byte, tail) = rest.split_first()?;
        *rest = tail;
        n |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn take(rest: &mut &[u8]) -> Option<String> {
    let len = take_len(rest)?;
    let (s, tail) = (rest.get(..len)?, rest.get(len..)?);
    *rest = tail;
    String::from_utf8(s.to_vec()).ok()
}
