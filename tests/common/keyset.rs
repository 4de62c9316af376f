//! A key-set endpoint for the tests: a plain-thread HTTP/1.1 server on 127.0.0.1 (OS-picked
//! port, keep-alive, as Envoy pools its connections) that serves a mutable map path → body,
//! records every request (with its body), and fails on demand. It is also the usage receiver that
//! fails (tests/usage.rs): whatever the method, a path in the map answers its body, so a `put` of
//! the receiver's path makes it take `POST`s, whose bodies [`KeySetServer::requests_for`] returns.
//!
//! ```ignore
//! let server = KeySetServer::start();
//! server.publish(&[record("k1", &hash_of_key, false)], 1, 1);   // manifest + 16 shards
//! server.set_fault(MANIFEST_PATH, Some(Fault::Status(503)));  // the manifest now answers 503
//! server.set_fault(MANIFEST_PATH, None);
//! server.go_down();                                          // connection refused…
//! server.come_up();                                          // …until now, same port
//! assert_eq!(server.count(MANIFEST_PATH), 3);
//! ```
//!
//! # What it answers
//!
//! - A path in the map: `200`, `content-type: application/json`, and `ETag: "<SHA-256 of the
//!   body, hex>"`; a request whose `If-None-Match` names that tag gets `304` with no body. Both
//!   can be switched off ([`KeySetServer::set_etags`]) to play a server without ETag support.
//! - Any other path: `404`.
//! - A [`Fault`] set for the path (or for every path) replaces that answer.
//!
//! # Publishing
//!
//! [`KeySetServer::publish`] lays the key set out with keygate-core's
//! [`layout`](keygate_core::layout), the one writer of the format (the CLI's `keygate config
//! --shards` writes the same): records sharded by the first `digits` hex digits of their lowercase
//! hash, one shard document `{"keys": [...]}` per prefix at `/keyset/shards/<prefix or "all">.json`,
//! and the manifest at [`MANIFEST_PATH`] listing each shard with its relative path and the SHA-256
//! of its bytes. All of it is swapped in at once, so Envoy never sees a manifest without its shards.
//! [`Publication`] lets a test tamper with a shard (a wrong etag, a key in the wrong shard)
//! before publishing it.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use keygate_core::layout::{self, Entry, Layout, Record};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::http1;

/// Where [`KeySetServer::publish`] puts the manifest.
pub const MANIFEST_PATH: &str = "/keyset/manifest.json";

/// The directory the manifest's relative shard paths are resolved against.
pub const KEYSET_DIR: &str = "/keyset/";

/// The page [`Fault::Html`] serves.
pub const HTML_PAGE: &str = "<!DOCTYPE html>\n<html><head><title>Maintenance</title></head>\
<body><h1>We'll be back soon</h1></body></html>\n";

/// How a path (or every path) misbehaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The request is read, then the connection is closed with no reply.
    Down,
    /// This status with a short `text/plain` body (a 5xx, say).
    Status(u16),
    /// The normal answer, sent after this delay (past the fetch timeout, say).
    Slow(Duration),
    /// `200 text/html` with [`HTML_PAGE`], as a captive portal or an error page would send.
    Html,
    /// `200` with the first half of the body, its `content-length` saying so: a well-formed
    /// HTTP reply carrying a truncated document.
    Truncated,
    /// `200` announcing the whole body's length, then half of it, then the connection closes.
    CutOff,
    /// Bytes that are no HTTP reply, then the connection closes.
    Garbage,
}

/// What [`Fault::Garbage`] sends.
pub const GARBAGE: &[u8] = b"\x00\x01garbage, not HTTP at all\r\n\r\n";

/// One request as the key-set server received it.
#[derive(Clone, Debug)]
pub struct KeySetRequest {
    pub method: String,
    /// The request target as received.
    pub path: String,
    /// Header fields in arrival order, names lowercased.
    pub headers: Vec<(String, String)>,
    /// When the request's head had been read.
    pub at: Instant,
    /// The status of the reply (recorded before it is sent, so it is there by the time the
    /// client has it; a [`Fault::Slow`] reply is recorded before its delay); `None` when the
    /// connection was closed instead ([`Fault::Down`], [`Fault::Garbage`]).
    pub status: Option<u16>,
    /// The request's body.
    pub body: Vec<u8>,
}

impl KeySetRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One shard of a [`Publication`].
#[derive(Clone, Debug)]
pub struct Shard {
    pub prefix: String,
    /// As the manifest lists it: `shards/<prefix or all>.json`.
    pub path: String,
    /// The shard document's exact bytes.
    pub body: Vec<u8>,
    /// The manifest's `etag` for this shard, when it must not be the SHA-256 of `body`.
    pub etag_override: Option<String>,
}

impl Shard {
    /// The path the server serves it at.
    pub fn served_path(&self) -> String {
        format!("{KEYSET_DIR}{}", self.path)
    }

    /// The manifest's `etag`: the override, else the SHA-256 of the body in hex.
    pub fn etag(&self) -> String {
        self.etag_override.clone().unwrap_or_else(|| sha256_hex(&self.body))
    }
}

/// A key set laid out as manifest and shards, not yet served.
#[derive(Clone, Debug)]
pub struct Publication {
    pub version: String,
    /// In prefix order.
    pub shards: Vec<Shard>,
}

impl Publication {
    /// The layout of `records` (JSON key records, as in the configuration's `keys`): `16^digits`
    /// shards by the first `digits` hex digits of each lowercase `hash`.
    pub fn new(records: &[Value], digits: usize, version: impl ToString) -> Publication {
        let texts: Vec<(String, String)> = records
            .iter()
            .map(|r| {
                let hash = r["hash"].as_str().expect("key record without a string hash").to_string();
                (hash, serde_json::to_string(r).expect("record to JSON"))
            })
            .collect();
        let records: Vec<Record<'_>> = texts.iter().map(|(hash, json)| Record { hash, json }).collect();
        let laid_out = Layout::new(&records, digits, &version.to_string()).unwrap_or_else(|e| panic!("layout: {e}"));
        let shards = laid_out
            .shards
            .into_iter()
            .map(|s| Shard { prefix: s.prefix, path: s.path, body: s.body, etag_override: None })
            .collect();
        Publication { version: laid_out.version, shards }
    }

    /// The shard whose prefix is `prefix`; panics if none.
    pub fn shard_mut(&mut self, prefix: &str) -> &mut Shard {
        self.shards.iter_mut().find(|s| s.prefix == prefix).unwrap_or_else(|| panic!("no shard with prefix {prefix:?}"))
    }

    /// The shard that holds `hash` (by its prefix); panics if none.
    pub fn shard_of(&self, hash: &str) -> &Shard {
        let hash = hash.to_ascii_lowercase();
        self.shards.iter().find(|s| hash.starts_with(&s.prefix)).expect("some shard covers every hash")
    }

    /// The manifest document.
    pub fn manifest(&self) -> Value {
        serde_json::from_slice(&self.manifest_bytes()).expect("the manifest is JSON")
    }

    /// The manifest's bytes as served: each shard's etag as [`Shard::etag`] says.
    pub fn manifest_bytes(&self) -> Vec<u8> {
        let etags: Vec<String> = self.shards.iter().map(Shard::etag).collect();
        let entries: Vec<Entry<'_>> =
            self.shards.iter().zip(&etags).map(|(s, etag)| Entry { prefix: &s.prefix, path: &s.path, etag }).collect();
        layout::manifest_document(&self.version, &entries)
    }
}

/// A shard document's bytes: `{"keys": [...]}`.
pub fn shard_body(records: &[Value]) -> Vec<u8> {
    let texts: Vec<String> = records.iter().map(|r| serde_json::to_string(r).expect("record to JSON")).collect();
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    layout::shard_document(&texts)
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[derive(Default)]
struct Content {
    bodies: BTreeMap<String, Vec<u8>>,
    etags: bool,
    faults: HashMap<String, Fault>,
    global_fault: Option<Fault>,
}

#[derive(Default)]
struct State {
    content: Mutex<Content>,
    requests: Mutex<Vec<KeySetRequest>>,
    /// Set to stop the accept loop (going down, or Drop).
    stop: AtomicBool,
    /// Set on Drop: a `Slow` reply stops waiting (as it does when `stop` is set).
    dropping: AtomicBool,
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A key-set endpoint. Stops (every thread joined) on Drop.
pub struct KeySetServer {
    port: u16,
    state: Arc<State>,
    accept: Mutex<Option<JoinHandle<()>>>,
}

impl KeySetServer {
    /// Starts serving on a fresh port, with nothing published and ETags on.
    pub fn start() -> KeySetServer {
        let server = KeySetServer::start_down();
        server.come_up();
        server
    }

    /// Picks a port but does not listen on it yet (connections are refused) until
    /// [`KeySetServer::come_up`]: an endpoint that is down when Envoy starts.
    pub fn start_down() -> KeySetServer {
        let port =
            TcpListener::bind(("127.0.0.1", 0)).and_then(|l| l.local_addr()).expect("keyset: bind 127.0.0.1:0").port();
        let state = Arc::new(State::default());
        lock(&state.content).etags = true;
        KeySetServer { port, state, accept: Mutex::new(None) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether it is listening.
    pub fn is_up(&self) -> bool {
        lock(&self.accept).is_some()
    }

    /// Starts listening (again) on the same port. Panics if the port cannot be bound.
    pub fn come_up(&self) {
        let mut accept = lock(&self.accept);
        if accept.is_some() {
            return;
        }
        // The port was ours a moment ago; a connection of the last life in TIME_WAIT does not
        // stop std's listener, which sets SO_REUSEADDR. Retry briefly in case it is still held.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("keyset: rebinding port {}: {e}; retrying", self.port);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("keyset: cannot bind 127.0.0.1:{} again: {e}", self.port),
            }
        };
        self.state.stop.store(false, Ordering::SeqCst);
        let st = Arc::clone(&self.state);
        *accept = Some(
            std::thread::Builder::new()
                .name(format!("keyset-{}", self.port))
                .spawn(move || accept_loop(listener, st))
                .expect("keyset: spawn accept thread"),
        );
    }

    /// Stops listening and closes every open connection: from now on a connection is refused.
    pub fn go_down(&self) {
        let mut accept = lock(&self.accept);
        let Some(handle) = accept.take() else {
            return;
        };
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop, which then drops the listener.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        let _ = handle.join();
        self.close_connections();
    }

    fn close_connections(&self) {
        let conns = std::mem::take(&mut *lock(&self.state.conns));
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in conns {
            let _ = handle.join();
        }
    }

    /// Serves `body` at `path` (replacing what was there).
    pub fn put(&self, path: &str, body: impl Into<Vec<u8>>) {
        lock(&self.state.content).bodies.insert(path.to_string(), body.into());
    }

    /// Stops serving `path` (404 from now on).
    pub fn remove(&self, path: &str) {
        lock(&self.state.content).bodies.remove(path);
    }

    /// What is served at `path`.
    pub fn body(&self, path: &str) -> Option<Vec<u8>> {
        lock(&self.state.content).bodies.get(path).cloned()
    }

    /// Lays out `records` as `keygate config --shards` does and serves it (see the module docs); returns what it served.
    pub fn publish(&self, records: &[Value], digits: usize, version: impl ToString) -> Publication {
        let publication = Publication::new(records, digits, version);
        self.publish_built(&publication);
        publication
    }

    /// Serves `publication`'s shards and manifest, all at once.
    pub fn publish_built(&self, publication: &Publication) {
        let manifest = publication.manifest_bytes();
        let mut content = lock(&self.state.content);
        for shard in &publication.shards {
            content.bodies.insert(shard.served_path(), shard.body.clone());
        }
        content.bodies.insert(MANIFEST_PATH.to_string(), manifest);
    }

    /// ETag and If-None-Match handling on (the default) or off.
    pub fn set_etags(&self, on: bool) {
        lock(&self.state.content).etags = on;
    }

    /// Makes `path` misbehave (`Some`) or behave again (`None`).
    pub fn set_fault(&self, path: &str, fault: Option<Fault>) {
        let mut content = lock(&self.state.content);
        match fault {
            Some(f) => content.faults.insert(path.to_string(), f),
            None => content.faults.remove(path),
        };
    }

    /// Makes every path without a fault of its own misbehave (`Some`), or behave (`None`).
    pub fn set_global_fault(&self, fault: Option<Fault>) {
        lock(&self.state.content).global_fault = fault;
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        let mut content = lock(&self.state.content);
        content.faults.clear();
        content.global_fault = None;
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<KeySetRequest> {
        lock(&self.state.requests).clone()
    }

    /// How many requests for `path` were received.
    pub fn count(&self, path: &str) -> usize {
        lock(&self.state.requests).iter().filter(|r| r.path == path).count()
    }

    /// The requests for `path`.
    pub fn requests_for(&self, path: &str) -> Vec<KeySetRequest> {
        lock(&self.state.requests).iter().filter(|r| r.path == path).cloned().collect()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        lock(&self.state.requests).clear();
    }

    /// Waits up to `timeout` until `path` has been requested at least `n` times in all;
    /// returns whether it was.
    pub fn wait_for_requests(&self, path: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count(path) >= n {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for KeySetServer {
    fn drop(&mut self) {
        self.state.dropping.store(true, Ordering::SeqCst);
        self.go_down();
        // Connections accepted while down cannot exist; any left from before are closed.
        self.close_connections();
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    for stream in listener.incoming() {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let Ok(clone) = stream.try_clone() else {
            continue;
        };
        let st = Arc::clone(&state);
        let handle = std::thread::spawn(move || serve(stream, st));
        let mut conns = lock(&state.conns);
        conns.retain(|(_, h)| !h.is_finished());
        conns.push((clone, handle));
    }
}

/// The answer to one request: status, content type, ETag, body; and how to send it.
struct Answer {
    status: u16,
    content_type: &'static str,
    etag: Option<String>,
    body: Vec<u8>,
    /// `Some(n)`: announce the whole body but send only its first `n` bytes, then close.
    cut_at: Option<usize>,
}

fn answer(content: &Content, path: &str, if_none_match: Option<&str>) -> (Option<Fault>, Answer) {
    let fault = content.faults.get(path).or(content.global_fault.as_ref()).cloned();
    let served = content.bodies.get(path);
    let normal = match served {
        None => {
            Answer { status: 404, content_type: "text/plain", etag: None, body: b"not found\n".to_vec(), cut_at: None }
        }
        Some(body) => {
            let etag = content.etags.then(|| format!("\"{}\"", sha256_hex(body)));
            let not_modified = etag.as_deref().is_some_and(|tag| {
                if_none_match.is_some_and(|v| v.split(',').any(|t| t.trim() == tag || t.trim() == "*"))
            });
            Answer {
                status: if not_modified { 304 } else { 200 },
                content_type: "application/json",
                etag,
                body: if not_modified { Vec::new() } else { body.clone() },
                cut_at: None,
            }
        }
    };
    let answer = match &fault {
        None | Some(Fault::Down) | Some(Fault::Garbage) | Some(Fault::Slow(_)) => normal,
        Some(Fault::Status(status)) => Answer {
            status: *status,
            content_type: "text/plain",
            etag: None,
            body: format!("status {status}\n").into_bytes(),
            cut_at: None,
        },
        Some(Fault::Html) => Answer {
            status: 200,
            content_type: "text/html; charset=utf-8",
            etag: None,
            body: HTML_PAGE.as_bytes().to_vec(),
            cut_at: None,
        },
        Some(Fault::Truncated) => {
            let body = served.cloned().unwrap_or_default();
            Answer {
                status: 200,
                content_type: "application/json",
                etag: None,
                body: body[..body.len() / 2].to_vec(),
                cut_at: None,
            }
        }
        Some(Fault::CutOff) => {
            let body = served.cloned().unwrap_or_default();
            let half = body.len() / 2;
            Answer { status: 200, content_type: "application/json", etag: None, body, cut_at: Some(half) }
        }
    };
    (fault, answer)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        304 => "Not Modified",
        404 => "Not Found",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn serve(stream: TcpStream, state: Arc<State>) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let Ok(Some(head)) = http1::read_head(&mut reader) else {
            return;
        };
        let at = Instant::now();
        let Ok(body) = http1::read_request_body(&mut reader, &head) else {
            return;
        };
        let mut parts = head.start_line.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        let close = version != "HTTP/1.1" || head.values("connection").iter().any(|v| v.eq_ignore_ascii_case("close"));
        let if_none_match = head.values("if-none-match").first().map(|v| v.to_string());
        let (fault, answer) = answer(&lock(&state.content), &path, if_none_match.as_deref());

        let status = (!matches!(fault, Some(Fault::Down | Fault::Garbage))).then_some(answer.status);
        lock(&state.requests).push(KeySetRequest {
            method: method.clone(),
            path,
            headers: head.headers,
            at,
            status,
            body,
        });
        match fault {
            Some(Fault::Down) => {
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Garbage) => {
                let _ = writer.write_all(GARBAGE);
                let _ = writer.shutdown(Shutdown::Both);
                return;
            }
            Some(Fault::Slow(delay)) => {
                let until = Instant::now() + delay;
                while Instant::now() < until
                    && !state.dropping.load(Ordering::SeqCst)
                    && !state.stop.load(Ordering::SeqCst)
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            _ => {}
        }
        let mut reply = format!("HTTP/1.1 {} {}\r\n", answer.status, reason(answer.status));
        reply.push_str(&format!("content-type: {}\r\n", answer.content_type));
        if let Some(tag) = &answer.etag {
            reply.push_str(&format!("etag: {tag}\r\n"));
        }
        if answer.status != 304 {
            reply.push_str(&format!("content-length: {}\r\n", answer.body.len()));
        }
        if close {
            reply.push_str("connection: close\r\n");
        }
        reply.push_str("\r\n");
        let mut bytes = reply.into_bytes();
        let sent_body = match answer.cut_at {
            Some(n) => &answer.body[..n],
            None => &answer.body[..],
        };
        if method != "HEAD" {
            bytes.extend_from_slice(sent_body);
        }
        if writer.write_all(&bytes).and_then(|()| writer.flush()).is_err() {
            return;
        }
        if close || answer.cut_at.is_some() {
            let _ = writer.shutdown(Shutdown::Both);
            return;
        }
    }
}
