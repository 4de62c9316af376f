//! A live key set on a static origin: a real nginx serves the directory `keygate config --shards`
//! writes, with the README's `location` block, and Envoy (on the host under test) polls it through
//! a cluster. A key in the set is 200 and an unknown one 401; a revocation republished with the CLI
//! is refused within the poll interval and a margin; nginx answers keygate's conditional polls 304
//! while nothing changed, with the very `ETag` it sent (strong, made from the file's mtime in whole
//! seconds and its size), and sends each shard once, a changed one again and no other; and two
//! publications within one second, which that `ETag` alone cannot tell apart, both reach Envoy.
//!
//! What nginx did is read from its access log, which logs each request's `If-None-Match` and the
//! `ETag` sent. nginx is `$NGINX`, else the copy `make nginx-deps` unpacks into target/tools, else
//! `nginx` on the PATH. It runs as one process (`master_process off`, `daemon off`) with every
//! path it writes (pid, logs, temporary files) in the test's directory, and is killed at the end.

// Test code: a failed step is a panic, as in a #[test] function.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::readme::{checked_block, readme};
use common::scratch::Scratch;
use common::{get, keygate_binary, repo_root, Envoy, EnvoyOptions, Proto, Upstream, KEYSET_CLUSTER};
use keygate_core::keys::hash_key;
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where the README's block serves the key set, and the manifest's path there.
const MANIFEST: &str = "/keyset/manifest.json";
/// The directory the README's block names, replaced by the test's own.
const README_DIR: &str = "/srv/keygate/keyset/";
/// What the poll interval may be exceeded by before a change counts as late: the tick that
/// spreads it to the requests, the fetches, and a loaded machine.
const MARGIN: Duration = Duration::from_millis(1200);

impl Scratch {
    /// `keygate ARGS` in this directory; panics unless it succeeds. Returns its stdout.
    fn keygate(&self, args: &[&str]) -> String {
        let out = Command::new(keygate_binary()).args(args).current_dir(&self.0).output().unwrap();
        assert!(out.status.success(), "keygate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    /// `keygate new --org ORG --keys keys.json`: the new key.
    fn new_key(&self, org: &str) -> String {
        self.keygate(&["new", "--org", org, "--keys", "keys.json"]).trim_end().to_string()
    }

    fn revoke(&self, key: &str) {
        self.keygate(&["revoke", id_of(key), "--keys", "keys.json"]);
    }

    /// `keygate config --keys keys.json --shards www/keyset --manifest-version VERSION`, as the
    /// README publishes.
    fn publish(&self, version: &str) {
        self.keygate(&["config", "--keys", "keys.json", "--shards", "www/keyset", "--manifest-version", version]);
    }

    fn keyset_dir(&self) -> PathBuf {
        self.path("www/keyset")
    }
}

/// The id in `sk_live_{id}_{secret}`.
fn id_of(key: &str) -> &str {
    key.split('_').nth(2).unwrap()
}

/// The shard a key is in, with the CLI's default of one hex digit: `/keyset/shards/<d>.json`.
fn shard_of(key: &str) -> String {
    format!("/keyset/shards/{}.json", &hex::encode(hash_key(key.as_bytes()))[..1])
}

/// `$NGINX`, else the copy `make nginx-deps` unpacks, else `nginx` on the PATH.
fn nginx_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("NGINX") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "NGINX={}: no such file", path.display());
        return path;
    }
    let unpacked = repo_root().join("target/tools/nginx/usr/sbin/nginx");
    if unpacked.is_file() {
        return unpacked;
    }
    let on_path = std::env::var_os("PATH")
        .and_then(|paths| std::env::split_paths(&paths).map(|d| d.join("nginx")).find(|p| p.is_file()));
    on_path.unwrap_or_else(|| {
        panic!(
            "no nginx: run `make nginx-deps` (unpacks Debian's nginx package into target/tools), or set NGINX \
             to an nginx binary"
        )
    })
}

/// One request in nginx's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Logged {
    /// `Host`: keygate's `key_set.authority` (the cluster name here) on keygate's requests.
    host: String,
    method: String,
    uri: String,
    status: u16,
    /// The request's `If-None-Match`, `None` when it had none.
    if_none_match: Option<String>,
    /// The reply's `ETag`, `None` when there was none.
    etag: Option<String>,
    /// Body bytes sent.
    bytes: u64,
}

/// One field a line, `|` between them; a header that is absent is empty (with `escape=none`; `-`
/// otherwise).
const LOG_FORMAT: &str =
    "'$http_host|$request_method|$uri|$status|$http_if_none_match|$sent_http_etag|$body_bytes_sent'";

/// A running nginx serving one key-set directory with the README's block; killed on Drop.
struct Nginx {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Nginx {
    /// nginx on 127.0.0.1 (a port the system picks) serving `keyset` at `/keyset/` with the README's
    /// `location` block; its configuration, pid file, logs and temporary files in `dir`.
    fn start(dir: &Path, keyset: &Path) -> Nginx {
        let (block, language) = checked_block(&readme(), "nginx");
        assert_eq!(language, "nginx", "the nginx example's fence");
        assert_eq!(block.matches(README_DIR).count(), 1, "the README's nginx block names {README_DIR} once:\n{block}");
        let block = block.replace(README_DIR, &format!("\"{}/\"", keyset.display()));
        fs::create_dir_all(dir.join("temp")).unwrap();
        let binary = nginx_binary();
        let (config_path, error_log) = (dir.join("nginx.conf"), dir.join("error.log"));
        // The port is picked by binding port 0 and letting it go: another process may take it in
        // between, so an nginx that exits at start is tried again on another port.
        for _attempt in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let d = dir.display();
            let temp = ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"]
                .map(|t| format!("    {t}_temp_path \"{d}/temp/{t}\";\n"))
                .concat();
            let config = format!(
                "# One process in the foreground, so it dies with the test that started it and never\n\
                 # changes user; every file it writes is in this directory.\n\
                 daemon off;\n\
                 master_process off;\n\
                 pid \"{d}/nginx.pid\";\n\
                 error_log \"{d}/error.log\" info;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n\
                 \x20   log_format keygate escape=none {LOG_FORMAT};\n\
                 \x20   access_log \"{d}/access.log\" keygate;\n\
                 {temp}\
                 \x20   server {{\n\
                 \x20       listen 127.0.0.1:{port};\n\
                 {block}\
                 \x20   }}\n\
                 }}\n"
            );
            fs::write(&config_path, config).unwrap();
            let log = fs::File::create(dir.join("stdio.log")).unwrap();
            let mut cmd = Command::new(&binary);
            cmd.arg("-p")
                .arg(format!("{}/", dir.display()))
                .arg("-c")
                .arg(&config_path)
                .arg("-e")
                .arg(&error_log)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec. nginx
            // dies with the test thread that started it, should that die first.
            unsafe {
                use std::os::unix::process::CommandExt;
                cmd.pre_exec(|| {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let child = cmd.spawn().unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let mut nginx = Nginx { child, port, dir: dir.to_path_buf() };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if nginx.child.try_wait().unwrap().is_some() {
                    break; // the port was taken, most likely: another one
                }
                let request = b"HEAD /keyset/manifest.json HTTP/1.1\r\nhost: ready\r\nconnection: close\r\n\r\n";
                if common::try_raw_http1(port, request)
                    .is_ok_and(|r| r.header("server").is_some_and(|s| s.starts_with("nginx")))
                {
                    return nginx;
                }
                assert!(Instant::now() < deadline, "nginx not ready in 10 s:\n{}", nginx.logs());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx exited at start, five times:\n{}", fs::read_to_string(&error_log).unwrap_or_default())
    }

    fn logs(&self) -> String {
        let read = |name: &str| fs::read_to_string(self.dir.join(name)).unwrap_or_default();
        format!("error.log:\n{}\nstdio.log:\n{}", read("error.log"), read("stdio.log"))
    }

    /// keygate's requests so far (those with its `:authority`), in order. nginx writes each line
    /// when the request ends, unbuffered.
    fn keygate_requests(&self) -> Vec<Logged> {
        let text = fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let header = |v: &str| (!v.is_empty() && v != "-").then(|| v.to_string());
        text.lines()
            .map(|line| {
                let f: Vec<&str> = line.split('|').collect();
                assert_eq!(f.len(), 7, "access log line {line:?}");
                Logged {
                    host: f[0].to_string(),
                    method: f[1].to_string(),
                    uri: f[2].to_string(),
                    status: f[3].parse().unwrap(),
                    if_none_match: header(f[4]),
                    etag: header(f[5]),
                    bytes: f[6].parse().unwrap(),
                }
            })
            .filter(|r| r.host == KEYSET_CLUSTER)
            .collect()
    }

    /// Waits up to `within` for keygate's requests to satisfy `done`; returns them.
    fn wait_for(&self, within: Duration, what: &str, done: impl Fn(&[Logged]) -> bool) -> Vec<Logged> {
        let deadline = Instant::now() + within;
        loop {
            let requests = self.keygate_requests();
            if done(&requests) {
                return requests;
            }
            assert!(Instant::now() < deadline, "nginx: not {what} within {within:?}: {requests:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("nginx (pid {}) files kept in {}\n{}", self.child.id(), self.dir.display(), self.logs());
        }
    }
}

/// The ETag nginx gives a static file: its mtime in whole seconds and its size, in hex, quoted;
/// a strong validator.
fn nginx_etag(file: &Path) -> String {
    let meta = fs::metadata(file).unwrap();
    let mtime = meta.modified().unwrap().duration_since(UNIX_EPOCH).unwrap().as_secs();
    format!("\"{mtime:x}-{:x}\"", meta.len())
}

/// The second of the wall clock `t` falls in.
fn second_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// Envoy with a keygate that polls the manifest nginx serves every `poll_ms`, any valid key let
/// through to `upstream`.
fn envoy_polling(nginx: &Nginx, upstream: &Upstream, poll_ms: u64) -> Envoy {
    let config = format!(
        r#"{{"credential": {{"prefixes": ["sk_live_"]}},
            "key_set": {{"cluster": "{KEYSET_CLUSTER}", "path": "{MANIFEST}", "poll_interval_ms": {poll_ms}, "timeout_ms": 1000}}}}"#
    );
    let mut opts = EnvoyOptions::new(Some(&config), upstream.port());
    opts.keyset_port = Some(nginx.port);
    Envoy::start(&opts)
}

/// `GET /v1/x` with `key` as a Bearer credential.
fn status_with(envoy: &Envoy, key: &str) -> u16 {
    get(envoy.port(), Proto::Http1, "/v1/x", &[("authorization", &format!("Bearer {key}"))]).status
}

/// Polls until `key` answers `status`; panics after `within`. Returns how long it took.
fn wait_for_status(envoy: &Envoy, key: &str, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = status_with(envoy, key);
        if got == status {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "key {}: still {got} after {within:?}, not {status}", id_of(key));
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to 5 s for the key-set version gauge to read `version`.
fn wait_for_version(envoy: &Envoy, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while envoy.keygate_stat("keygate.key_set.version") != Some(version) {
        assert!(Instant::now() < deadline, "key set version {version} not loaded in 5 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_manifest(r: &Logged) -> bool {
    r.uri == MANIFEST
}

#[test]
fn nginx_serves_the_cli_key_set_answers_unchanged_polls_304_and_a_revocation_reaches_envoy_within_the_poll_interval() {
    const POLL: Duration = Duration::from_millis(300);
    let s = Scratch::new("revocation");
    let key = s.new_key("org_1");
    let other = s.new_key("org_2");
    s.publish("1");
    let nginx = Nginx::start(&s.path("nginx"), &s.keyset_dir());
    let upstream = Upstream::start();
    let envoy = envoy_polling(&nginx, &upstream, POLL.as_millis() as u64);

    // A key in the set is let through with its identity; an unknown one is refused unforwarded
    // once the whole set has loaded (before, it is 503 key_set_unavailable: the first load serves
    // each shard as it arrives).
    wait_for_status(&envoy, &key, 200, Duration::from_secs(10));
    wait_for_version(&envoy, 1);
    assert_eq!(upstream.requests().last().unwrap().header("x-api-key-id").as_deref(), Some(id_of(&key)));
    assert_eq!(status_with(&envoy, &other), 200);
    let forwarded = upstream.requests().len();
    let unknown = format!("sk_live_0badc0de_{}", "0".repeat(64));
    let reply = get(envoy.port(), Proto::Http1, "/v1/x", &[("authorization", &format!("Bearer {unknown}"))]);
    assert_eq!(reply.status, 401);
    assert_eq!(reply.body, r#"{"error":"invalid_api_key","message":"The API key is invalid or has been revoked."}"#);
    assert_eq!(upstream.requests().len(), forwarded, "a refused request reached the upstream");

    // A few polls of the unchanged manifest.
    let seen =
        nginx.wait_for(Duration::from_secs(5), "three 304s", |r| r.iter().filter(|r| r.status == 304).count() >= 3);
    let first_etag = nginx_etag(&s.keyset_dir().join("manifest.json"));
    assert!(!first_etag.starts_with("W/"), "nginx's ETag for a static file is strong: {first_etag}");
    let manifests: Vec<&Logged> = seen.iter().filter(|r| is_manifest(r)).collect();
    assert_eq!(
        (manifests[0].method.as_str(), manifests[0].status, manifests[0].if_none_match.as_deref()),
        ("GET", 200, None),
        "the first poll is unconditional: {seen:#?}"
    );
    assert_eq!(manifests[0].etag.as_deref(), Some(first_etag.as_str()), "nginx's ETag is the file's mtime and size");
    for poll in &manifests[1..] {
        assert_eq!(
            (poll.status, poll.if_none_match.as_deref(), poll.bytes),
            (304, Some(first_etag.as_str()), 0),
            "every later poll sends nginx's ETag back and gets 304 with no body: {seen:#?}"
        );
    }
    let shards: Vec<&Logged> = seen.iter().filter(|r| !is_manifest(r)).collect();
    let mut paths: Vec<&str> = shards.iter().map(|r| r.uri.as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!((shards.len(), paths.len()), (16, 16), "each of the 16 shards fetched once: {seen:#?}");
    assert!(shards.iter().all(|r| r.status == 200 && r.if_none_match.is_none()), "{seen:#?}");
    let syncs = envoy.keygate_stat("keygate.key_set.syncs").unwrap();
    assert!(syncs >= manifests.len() as u64, "every poll nginx answered is a good sync: {syncs}, {}", manifests.len());
    assert_eq!(envoy.keygate_stat("keygate.key_set.version"), Some(1));

    // Revoked with the CLI and republished: refused within the poll interval and a margin.
    s.revoke(&key);
    s.publish("2");
    let took = wait_for_status(&envoy, &key, 401, POLL + MARGIN);
    eprintln!("revocation through nginx took effect {took:?} after publication (poll interval {POLL:?})");
    assert_eq!(status_with(&envoy, &other), 200);

    // The new manifest came with a new ETag, which the polls after it send back; only the shard
    // that changed was fetched again.
    let before = seen.len();
    let all = nginx.wait_for(Duration::from_secs(5), "two 304s after the republication", |r| {
        r.get(before..).is_some_and(|new| new.iter().filter(|r| r.status == 304).count() >= 2)
    });
    let second_etag = nginx_etag(&s.keyset_dir().join("manifest.json"));
    assert_ne!(second_etag, first_etag);
    let new = &all[before..];
    let changed = new.iter().position(|r| is_manifest(r) && r.status == 200).unwrap();
    assert_eq!(new[changed].if_none_match.as_deref(), Some(first_etag.as_str()));
    assert_eq!(new[changed].etag.as_deref(), Some(second_etag.as_str()));
    assert!(new[..changed].iter().all(|r| is_manifest(r) && r.status == 304), "{new:#?}");
    let refetched: Vec<&str> = new.iter().filter(|r| !is_manifest(r)).map(|r| r.uri.as_str()).collect();
    assert_eq!(refetched, [shard_of(&key)], "only the revoked key's shard again: {new:#?}");
    for poll in new[changed + 1..].iter().filter(|r| is_manifest(r)) {
        assert_eq!((poll.status, poll.if_none_match.as_deref()), (304, Some(second_etag.as_str())), "{new:#?}");
    }
    assert_eq!(envoy.keygate_stat("keygate.key_set.version"), Some(2));
}

#[test]
fn a_revocation_published_within_the_second_of_the_previous_publication_reaches_envoy() {
    // nginx's ETag is the manifest's mtime in whole seconds and its size, and a revocation changes
    // neither the size nor, within one second, the mtime: were the new manifest written in the
    // second of the one keygate last loaded, nginx would answer keygate's If-None-Match 304 and
    // the revocation would never load. Each attempt publishes a key at the start of a second,
    // waits for Envoy to load it (and so hold that manifest's ETag), then revokes it at once;
    // an attempt whose revocation could not start within that second is tried again.
    const POLL: Duration = Duration::from_millis(100);
    let s = Scratch::new("same-second");
    let first = s.new_key("org_0");
    s.publish("1");
    let nginx = Nginx::start(&s.path("nginx"), &s.keyset_dir());
    let upstream = Upstream::start();
    let envoy = envoy_polling(&nginx, &upstream, POLL.as_millis() as u64);
    wait_for_status(&envoy, &first, 200, Duration::from_secs(10));
    wait_for_version(&envoy, 1);

    for attempt in 1..=3 {
        let key = s.new_key(&format!("org_{attempt}"));
        // The next second, just begun.
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        std::thread::sleep(
            Duration::from_secs(1) - Duration::from_nanos(u64::from(now.subsec_nanos())) + Duration::from_millis(30),
        );
        s.publish(&format!("{attempt}0"));
        let manifest = s.keyset_dir().join("manifest.json");
        let loaded = (fs::metadata(&manifest).unwrap().modified().unwrap(), nginx_etag(&manifest));
        wait_for_status(&envoy, &key, 200, Duration::from_secs(2));
        let revoking_at = SystemTime::now();
        s.revoke(&key);
        s.publish(&format!("{attempt}1"));
        if second_of(revoking_at) != second_of(loaded.0) {
            eprintln!("attempt {attempt}: the key loaded only in the next second; again");
            continue;
        }
        let took = wait_for_status(&envoy, &key, 401, POLL + MARGIN);
        let revoked_etag = nginx_etag(&manifest);
        assert_ne!(revoked_etag, loaded.1, "the revocation's manifest has an ETag of its own");
        let polls: Vec<Logged> = nginx.keygate_requests().into_iter().filter(is_manifest).collect();
        assert!(
            polls.iter().any(|r| r.if_none_match.as_deref() == Some(loaded.1.as_str())
                && r.etag.as_deref() == Some(revoked_etag.as_str())
                && r.status == 200),
            "keygate sent the loaded ETag and nginx answered with the new manifest: {polls:#?}"
        );
        eprintln!("attempt {attempt}: the revocation took effect {took:?} after its publication");
        assert_eq!(status_with(&envoy, &first), 200);
        return;
    }
    panic!("in three attempts the key never loaded within the second of its publication: the machine is too slow for this test");
}
