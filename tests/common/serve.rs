//! A running `keygate serve` (the CLI's key-set endpoint and usage receiver), for tests/cli.rs and
//! tests/usage.rs: started on a port the system picks, its stderr lines kept, stopped with SIGTERM
//! ([`KeygateServe::stop`]) or killed when dropped.
//!
//! ```ignore
//! let serve = KeygateServe::start(dir, "public", "usage");      // in `dir`: --keys public --usage-dir usage
//! assert_eq!(serve.post_usage(&report).status, 200);
//! let reports = serve.reports();                                // dir/usage/usage.jsonl, parsed
//! ```

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use keygate_core::usage::Report;

use super::client::{raw_http1, Response};
use super::envoy::keygate_binary;

pub struct KeygateServe {
    child: Option<Child>,
    pub port: u16,
    /// Every line it wrote to stderr so far.
    pub log: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// `--usage-dir`, as a path from the test's directory.
    usage_dir: PathBuf,
}

impl KeygateServe {
    /// `keygate serve --keys KEYS --usage-dir USAGE --listen 127.0.0.1:0`, run in `dir`.
    pub fn start(dir: &Path, keys: &str, usage: &str) -> KeygateServe {
        let mut child = Command::new(keygate_binary())
            .args(["serve", "--keys", keys, "--usage-dir", usage, "--listen", "127.0.0.1:0"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut first = String::new();
        stderr.read_line(&mut first).unwrap();
        let port = first
            .strip_prefix("keygate serve: listening on http://127.0.0.1:")
            .and_then(|rest| rest.split(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("keygate serve did not start: {first:?}"));
        let log = Arc::new(Mutex::new(vec![first.trim_end().to_string()]));
        let lines = log.clone();
        let reader = std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        KeygateServe { child: Some(child), port, log, reader: Some(reader), usage_dir: dir.join(usage) }
    }

    /// SIGTERM; returns the exit code and every line it wrote.
    pub fn stop(mut self) -> (Option<i32>, Vec<String>) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) with the pid of a child this test started and has not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        self.reader.take().unwrap().join().unwrap();
        (status.code(), self.log.lock().unwrap().clone())
    }

    pub fn get(&self, path: &str, headers: &str) -> Response {
        raw_http1(
            self.port,
            format!("GET {path} HTTP/1.1\r\nHost: keys\r\n{headers}Connection: close\r\n\r\n").as_bytes(),
        )
    }

    pub fn post_usage(&self, body: &str) -> Response {
        let request = format!(
            "POST /usage HTTP/1.1\r\nHost: keys\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        raw_http1(self.port, request.as_bytes())
    }

    /// The reports it stored so far (`usage.jsonl`, whole lines), each read as a receiver does.
    pub fn reports(&self) -> Vec<Report> {
        let text = std::fs::read_to_string(self.usage_dir.join("usage.jsonl")).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole.lines().filter(|l| !l.trim().is_empty()).map(|l| Report::parse(l.as_bytes()).unwrap()).collect()
    }
}

impl Drop for KeygateServe {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
