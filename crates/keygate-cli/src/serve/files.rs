//! The key-set directory as `keygate serve` offers it: which request paths name a file in it,
//! the file's strong `ETag`, and `If-None-Match`.
//!
//! A request path is served only if each of its segments is a plain name: letters, digits, `.`,
//! `_` and `-`, not starting with `.`. So `..`, `.`-files, `%`-escapes, backslashes and empty
//! segments are never read, whatever they would decode to. Neither is a temporary file of an
//! atomic write (`*.keygate-tmp`, the half-written manifest of a publication under way) nor a lock
//! file (`*.lock`). The file found must lie under the directory once symbolic links are resolved.
//!
//! Every request reads the file afresh: `keygate config --shards` replaces each file by a rename,
//! so a request reads the old file or the new one whole, and a republished manifest is served from
//! the next request on.

use keygate_core::keys::hash_key;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest file served, as the filter's largest `max_shard_bytes` (1 GiB).
pub const MAX_FILE: u64 = 1 << 30;

/// The directory served.
#[derive(Debug)]
pub struct KeySetDir {
    root: PathBuf,
}

/// What a GET of a path finds.
#[derive(Debug, PartialEq, Eq)]
pub enum Lookup {
    /// The file's bytes and their `ETag`.
    File { body: Vec<u8>, etag: String },
    /// The request's `If-None-Match` names the file's `ETag`.
    NotModified { etag: String },
    /// No file is served at that path.
    NotFound,
    /// The file is there but could not be read, or is larger than [`MAX_FILE`].
    Unreadable,
}

impl KeySetDir {
    pub fn open(dir: &Path) -> Result<KeySetDir, String> {
        let root = std::fs::canonicalize(dir)
            .map_err(|e| format!("{}: cannot open: {}", dir.display(), crate::keyset::io_reason(&e)))?;
        if !root.is_dir() {
            return Err(format!("{}: not a directory", dir.display()));
        }
        Ok(KeySetDir { root })
    }

    /// The file at request path `path` (without its query), if `if_none_match` does not name it.
    pub fn get(&self, path: &str, if_none_match: Option<&str>) -> Lookup {
        let Some(relative) = relative_path(path) else { return Lookup::NotFound };
        let Ok(file) = std::fs::canonicalize(self.root.join(relative)) else { return Lookup::NotFound };
        if !file.starts_with(&self.root) {
            return Lookup::NotFound;
        }
        let Ok(mut opened) = File::open(&file) else { return Lookup::NotFound };
        match opened.metadata() {
            Ok(m) if m.is_file() => {}
            Ok(_) => return Lookup::NotFound,
            Err(_) => return Lookup::Unreadable,
        }
        let mut body = Vec::new();
        if opened.by_ref().take(MAX_FILE + 1).read_to_end(&mut body).is_err() || body.len() as u64 > MAX_FILE {
            return Lookup::Unreadable;
        }
        let etag = etag_of(&body);
        if if_none_match.is_some_and(|header| none_match(header, &etag)) {
            return Lookup::NotModified { etag };
        }
        Lookup::File { body, etag }
    }
}

/// The file a request path names, relative to the directory, if it is one that may be served.
pub fn relative_path(path: &str) -> Option<PathBuf> {
    let rest = path.strip_prefix('/')?;
    let mut out = PathBuf::new();
    for segment in rest.split('/') {
        let plain = segment.bytes().all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if segment.is_empty() || segment.starts_with('.') || !plain {
            return None;
        }
        out.push(segment);
    }
    let name = out.file_name()?.to_str()?;
    if name.ends_with(".keygate-tmp") || name.ends_with(".lock") {
        return None;
    }
    Some(out)
}

/// A strong `ETag`: the SHA-256 of the body in hex, quoted.
pub fn etag_of(body: &[u8]) -> String {
    format!("\"{}\"", hex::encode(hash_key(body)))
}

/// Whether an `If-None-Match` value names `etag`: `*`, or a list of tags one of which is it,
/// compared weakly as RFC 9110 asks for `If-None-Match` (`W/"x"` names `"x"`).
pub fn none_match(header: &str, etag: &str) -> bool {
    let header = header.trim();
    if header == "*" {
        return true;
    }
    header.split(',').map(str::trim).any(|tag| tag.strip_prefix("W/").unwrap_or(tag) == etag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("keygate-files-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("keyset/shards")).unwrap();
        d
    }

    #[test]
    fn only_plain_names_under_the_directory_are_paths() {
        assert_eq!(relative_path("/manifest.json"), Some(PathBuf::from("manifest.json")));
        assert_eq!(relative_path("/shards/0.json"), Some(PathBuf::from("shards/0.json")));
        for refused in [
            "",
            "/",
            "manifest.json",
            "/../etc/passwd",
            "/shards/../manifest.json",
            "/./manifest.json",
            "/.hidden",
            "/shards//0.json",
            "/shards/",
            "/%2e%2e/etc/passwd",
            "/shards%2F0.json",
            "/shards\\0.json",
            "//etc/passwd",
            "/manifest.json.keygate-tmp",
            "/manifest.json.lock",
            "/a b",
            "/caf\u{e9}",
        ] {
            assert_eq!(relative_path(refused), None, "{refused:?}");
        }
    }

    #[test]
    fn a_file_is_served_with_its_sha256_as_etag_and_304_when_named() {
        let d = dir("serve");
        fs::write(d.join("keyset/manifest.json"), b"{}").unwrap();
        let served = KeySetDir::open(&d.join("keyset")).unwrap();
        let etag = format!("\"{}\"", hex::encode(hash_key(b"{}")));
        assert_eq!(served.get("/manifest.json", None), Lookup::File { body: b"{}".to_vec(), etag: etag.clone() });
        for header in [etag.clone(), format!("W/{etag}"), format!("\"x\", {etag}"), "*".to_string()] {
            assert_eq!(served.get("/manifest.json", Some(&header)), Lookup::NotModified { etag: etag.clone() });
        }
        assert!(matches!(served.get("/manifest.json", Some("\"other\"")), Lookup::File { .. }));
        fs::write(d.join("keyset/manifest.json"), b"{\"v\": 2}").unwrap();
        assert!(matches!(served.get("/manifest.json", Some(&etag)), Lookup::File { .. }), "a change was not seen");
        assert_eq!(served.get("/shards", None), Lookup::NotFound);
        assert_eq!(served.get("/nope.json", None), Lookup::NotFound);
        let _ = fs::remove_dir_all(&d);
    }

    #[cfg(unix)]
    #[test]
    fn a_link_out_of_the_directory_is_not_followed() {
        let d = dir("link");
        fs::write(d.join("secret.json"), b"{}").unwrap();
        std::os::unix::fs::symlink(d.join("secret.json"), d.join("keyset/out.json")).unwrap();
        let served = KeySetDir::open(&d.join("keyset")).unwrap();
        assert_eq!(served.get("/out.json", None), Lookup::NotFound);
        let _ = fs::remove_dir_all(&d);
    }
}
