//! The live demo (`make run-live`, envoy/live/demo.sh) works end to end as the README's walkthrough
//! shows it. The script runs as `make run-live` runs it, with a temporary demo directory and free
//! ports, and the commands it prints are run as printed: the reader key's call is 200; after the
//! printed revocation, the same call is 401 within the poll interval and a margin; the other key's
//! calls answer 200, 200, 200, 403; and `keygate list --usage` shows each key's requests, counted
//! from the reports Envoy posted to `keygate serve`, and a last-used time. Ctrl-C (SIGINT to the
//! script's process group, as a terminal sends it) stops Envoy and `keygate serve`, leaving no
//! process behind. Run again, the demo keeps its keys and says the reader key is revoked. The
//! README's walkthrough holds the same commands, in the same order.
//!
//! The demo runs the wasm filter, which reports usage; on the native host this says so and returns.

// Test code: helpers outside #[test] functions fail the same way the tests do, by panicking.
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

mod common;

use common::envoy::Host;
use common::readme::{checked_block, readme};
use common::{envoy_binary, keygate_binary, repo_root, wasm_path};
use std::io::{BufRead, BufReader, Read};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// envoy/live/envoy.yaml's `key_set.poll_interval_ms` and `usage.flush_interval_ms`.
const POLL: Duration = Duration::from_millis(1_000);
const FLUSH: Duration = Duration::from_millis(2_000);
/// What a change may take beyond its interval on a shared machine: a tick, a slow poll.
const MARGIN: Duration = Duration::from_millis(2_000);
/// How long the script may take to print its instructions: keys made, Envoy ready, key set loaded.
const START: Duration = Duration::from_secs(60);
/// The script's last line before it waits on Envoy.
const READY_LINE: &str = "Ctrl-C stops Envoy and keygate serve.";

/// The ports the demo is run with, and the ones envoy/live/envoy.yaml has (what the README shows).
struct Ports {
    api: u16,
    admin: u16,
    echo: u16,
    serve: u16,
}

const SHIPPED: Ports = Ports { api: 10000, admin: 9901, echo: 10001, serve: 8089 };

impl Ports {
    /// Four ports nothing listens on now (the system picks them; released for the demo to bind).
    fn free() -> Ports {
        let listeners: Vec<TcpListener> = (0..4).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let port = |i: usize| listeners[i].local_addr().unwrap().port();
        Ports { api: port(0), admin: port(1), echo: port(2), serve: port(3) }
    }
}

/// The script, running in a process group of its own, as a terminal runs a foreground job.
struct Demo {
    child: Option<Child>,
    lines: Receiver<String>,
    stderr: Arc<Mutex<String>>,
}

impl Demo {
    /// `sh envoy/live/demo.sh ENVOY KEYGATE` from the repository root, as `make run-live` runs it;
    /// returns it with what it printed up to [`READY_LINE`].
    fn start(dir: &Path, ports: &Ports) -> (Demo, Vec<String>) {
        let mut command = Command::new("sh");
        // SAFETY: signal(2) and prctl(2) are async-signal-safe; nothing else runs between fork
        // and exec. SIGINT as a terminal's foreground job has it (a test run from a background
        // job inherits it ignored, which a shell's trap cannot undo); SIGTERM to the script if the
        // test process dies, so that it stops its children.
        unsafe {
            command.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .arg("envoy/live/demo.sh")
            .arg(envoy_binary())
            .arg(keygate_binary())
            .current_dir(repo_root())
            .env("DEMO_DIR", dir)
            .env("DEMO_PORT", ports.api.to_string())
            .env("DEMO_ADMIN_PORT", ports.admin.to_string())
            .env("DEMO_ECHO_PORT", ports.echo.to_string())
            .env("DEMO_SERVE_PORT", ports.serve.to_string())
            .env("KEYGATE_WASM", wasm_path())
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = mpsc::channel();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let (mut pipe, text) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut buf) {
                text.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        let demo = Demo { child: Some(child), lines, stderr };
        let deadline = Instant::now() + START;
        let mut printed = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match demo.lines.recv_timeout(left) {
                Ok(line) if line == READY_LINE => return (demo, printed),
                Ok(line) => printed.push(line),
                Err(_) => panic!(
                    "the demo printed no {READY_LINE:?} within {START:?}; stdout:\n{}\nstderr:\n{}",
                    printed.join("\n"),
                    demo.stderr()
                ),
            }
        }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    fn pgid(&self) -> libc::pid_t {
        libc::pid_t::try_from(self.child.as_ref().unwrap().id()).unwrap()
    }

    /// Ctrl-C: SIGINT to the whole process group; returns the script's exit code once it is gone.
    fn interrupt(&mut self) -> Option<i32> {
        let pgid = self.pgid();
        // SAFETY: kill(2) with the process group of a child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(-pgid, libc::SIGINT) }, 0);
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                // The group is empty: Envoy and keygate serve are gone too (the script waits for them).
                // SAFETY: signal 0 only checks whether a process of the group exists.
                let left = unsafe { libc::kill(-pgid, 0) };
                let errno = std::io::Error::last_os_error().raw_os_error();
                assert!(left == -1 && errno == Some(libc::ESRCH), "a process of the demo is still running");
                return status.code();
            }
            assert!(Instant::now() < deadline, "the demo did not stop within 15 s of Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        let pgid = libc::pid_t::try_from(child.id()).unwrap();
        // SAFETY: kill(2) with the process group of a child this test started; SIGTERM lets the
        // script stop its children, SIGKILL then ends whatever is left of the group.
        unsafe { libc::kill(-pgid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        // SAFETY: as above.
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
        let _ = child.wait();
    }
}

/// One numbered step of the printed instructions: its comment and its command (one line or more).
#[derive(Debug)]
struct Step {
    comment: String,
    command: String,
}

/// The steps of the printed instructions: a line `  # N. …`, then the command's lines, indented,
/// up to a blank line.
fn steps(printed: &[String]) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    let mut open = false;
    for line in printed {
        let numbered = line.strip_prefix("  # ").filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()));
        if let Some(comment) = numbered {
            steps.push(Step { comment: comment.to_string(), command: String::new() });
            open = true;
        } else if line.trim().is_empty() {
            open = false;
        } else if open {
            let step = steps.last_mut().unwrap();
            if !step.command.is_empty() {
                step.command.push('\n');
            }
            step.command.push_str(line.strip_prefix("  ").unwrap_or(line));
        }
    }
    for (i, step) in steps.iter().enumerate() {
        assert!(step.comment.starts_with(&format!("{}. ", i + 1)), "step {} is {step:?}", i + 1);
        assert!(!step.command.is_empty(), "step {step:?} has no command");
    }
    steps
}

#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs a printed command as a person pastes it: `sh -c`, from the repository root.
fn paste(command: &str) -> Run {
    let out = Command::new("sh").args(["-c", command]).current_dir(repo_root()).output().unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// The demo's keys, as the script keeps them in `keys.env` (`NAME=key` lines).
fn demo_key(dir: &Path, name: &str) -> String {
    let text = std::fs::read_to_string(dir.join("keys.env")).unwrap();
    let prefix = format!("{name}=");
    text.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {name} in keys.env")).to_string()
}

/// The id in `sk_live_{id}_{secret}`.
fn id_of(key: &str) -> String {
    key.split('_').nth(2).unwrap().to_string()
}

/// The rows of `keygate list`, each split into its columns (two spaces or more apart), by id.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .map(|line| line.split("  ").map(str::trim).filter(|c| !c.is_empty()).map(str::to_string).collect())
        .collect()
}

/// `text` with what differs between two runs made generic: this run's paths and ports as the
/// shipped demo has them, each key id as `<id>` and each key's secret as `<secret>`.
fn generic(text: &str, dir: &Path, ports: &Ports) -> String {
    let mut text = text
        .replace(&dir.display().to_string(), "target/demo-live")
        .replace(&keygate_binary().display().to_string(), "target/debug/keygate");
    for (ours, shipped) in [
        (ports.api, SHIPPED.api),
        (ports.admin, SHIPPED.admin),
        (ports.echo, SHIPPED.echo),
        (ports.serve, SHIPPED.serve),
    ] {
        text = text.replace(&format!("127.0.0.1:{ours}"), &format!("127.0.0.1:{shipped}"));
    }
    // sk_live_<8 hex>_<hex or …>, and an id alone.
    let chars: Vec<char> = text.chars().collect();
    let hex = |c: char| c.is_ascii_hexdigit() && !c.is_ascii_uppercase();
    let mut out = String::new();
    let mut i = 0;
    while i < chars.len() {
        let boundary = i == 0 || !chars[i - 1].is_ascii_alphanumeric();
        let run = chars[i..].iter().take_while(|c| hex(**c)).count();
        if boundary && run == 8 && chars.get(i + 8).is_none_or(|c| !c.is_ascii_alphanumeric()) {
            out.push_str("<id>");
            i += 8;
            if chars.get(i) == Some(&'_') {
                let secret = chars[i + 1..].iter().take_while(|c| hex(**c) || **c == '…').count();
                if secret > 0 {
                    out.push_str("_<secret>");
                    i += 1 + secret;
                }
            }
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

/// The commands of the README's walkthrough (`$ ` lines, with their `> ` continuation lines).
fn readme_commands() -> Vec<String> {
    let (block, language) = checked_block(&readme(), "live_demo");
    assert_eq!(language, "console", "the walkthrough's fence");
    let mut commands: Vec<String> = Vec::new();
    for line in block.lines() {
        if let Some(command) = line.strip_prefix("$ ") {
            commands.push(command.to_string());
        } else if let (Some(more), Some(last)) = (line.strip_prefix("> "), commands.last_mut()) {
            last.push('\n');
            last.push_str(more);
        }
    }
    commands
}

/// Pastes `command` until its output satisfies `done`, at most `within`; returns the last run and
/// how many times it ran.
fn paste_until(command: &str, within: Duration, done: impl Fn(&Run) -> bool) -> (Run, u64) {
    let deadline = Instant::now() + within;
    let mut runs = 0;
    loop {
        let run = paste(command);
        runs += 1;
        if done(&run) {
            return (run, runs);
        }
        assert!(Instant::now() < deadline, "`{command}` not as expected within {within:?}: {run:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A directory for the test's demo, removed at the end unless the test failed.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[test]
fn the_live_demo_serves_a_key_refuses_it_once_revoked_and_lists_the_use_of_each_key() {
    if !Host::Wasm.tested_or_say("the live demo", "it runs the wasm filter, which reports usage") {
        return;
    }
    assert!(
        Command::new("curl").arg("--version").output().is_ok_and(|o| o.status.success()),
        "the demo's commands use curl, which is not installed"
    );
    let scratch = Scratch(Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("demo-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    let dir = scratch.0.join("demo-live");
    let ports = Ports::free();
    let started = std::time::SystemTime::now();
    let (mut demo, printed) = Demo::start(&dir, &ports);
    let steps = steps(&printed);
    assert_eq!(steps.len(), 5, "{printed:#?}");
    let reader = demo_key(&dir, "READER");
    let partner = demo_key(&dir, "PARTNER");
    let spare = demo_key(&dir, "SPARE");
    let (reader_id, partner_id, spare_id) = (id_of(&reader), id_of(&partner), id_of(&spare));
    let keys_json = std::fs::read_to_string(dir.join("keys.json")).unwrap();
    assert!(!keys_json.contains(&reader[17..]), "keys.json holds a secret");

    // 1. The reader key: 200, and the upstream saw who called, not the key.
    let run = paste(&steps[0].command);
    let echo: serde_json::Value =
        serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("step 1: {e}: {run:#?}\n{}", demo.stderr()));
    let seen = &echo["upstream_received"]["headers"];
    assert_eq!(seen["x-api-key-id"], reader_id.as_str(), "{run:#?}");
    assert_eq!((seen["x-org-id"].as_str(), seen["x-venue-id"].as_str()), (Some("org_42"), Some("v_7")));
    assert!(!run.stdout.contains(&reader), "the key reached the upstream: {run:#?}");

    // 2. Revoked and republished in one command.
    let run = paste(&steps[1].command);
    assert_eq!(run.code, Some(0), "{run:#?}");
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 2, "{run:#?}");
    assert_eq!(lines[0], format!("keygate: revoked key {reader_id} in {}", dir.join("keys.json").display()));
    let manifest = dir.join("public").join("manifest.json").display().to_string();
    assert!(lines[1].starts_with(&format!("keygate: wrote {manifest} (version ")), "{run:#?}");
    assert!(lines[1].ends_with(") and 16 shards holding 3 keys"), "{run:#?}");

    // 3. 401 from the next poll on.
    let (run, tries) =
        paste_until(&steps[2].command, POLL + MARGIN, |run| run.stdout.starts_with("HTTP/1.1 401 Unauthorized"));
    assert!(run
        .stdout
        .ends_with("{\"error\":\"invalid_api_key\",\"message\":\"The API key is invalid or has been revoked.\"}"));

    // 4. The other key: 200, 200, 200, 403.
    let run = paste(&steps[3].command);
    assert_eq!(
        run.stdout, "200 /v1/venues\n200 /v1/venues/v_7\n200 /v1/venues/v_8\n403 /v1/venues/v_7/treatments\n",
        "{run:#?}"
    );

    // 5. Once the next report is in: every request of each key, and when it was last used.
    let reader_requests = (1 + tries).to_string();
    let row = |table: &Run, id: &str| rows(&table.stdout).into_iter().find(|r| r[0] == id).unwrap();
    let (run, _) = paste_until(&steps[4].command, FLUSH + MARGIN, |run| {
        run.code == Some(0) && row(run, &reader_id)[8] == reader_requests && row(run, &partner_id)[8] == "4"
    });
    let table = rows(&run.stdout);
    assert_eq!(
        table[0],
        ["ID", "NAME", "PREVIEW", "ORG", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "REQUESTS", "STATUS"]
    );
    let since = started.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64 / 1000 * 1000;
    for (id, status) in [(&reader_id, "revoked"), (&partner_id, "active")] {
        let row = row(&run, id);
        let used = keygate_core::time::parse_rfc3339(&row[7]).unwrap_or_else(|e| panic!("{row:?}: {e:?}"));
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
        assert!(since <= used && used <= now, "last used {row:?}");
        assert_eq!(row[9], status);
    }
    let unused = row(&run, &spare_id);
    assert_eq!((unused[7].as_str(), unused[8].as_str(), unused[9].as_str()), ("never", "0", "active"));

    // The README's walkthrough holds the same commands.
    let printed_commands: Vec<String> = steps.iter().map(|s| generic(&s.command, &dir, &ports)).collect();
    let readme: Vec<String> = readme_commands().iter().map(|c| generic(c, &dir, &ports)).collect();
    assert_eq!(readme, printed_commands, "README.md's live_demo walkthrough is not what the demo prints");

    // Ctrl-C stops it all; nothing listens on its ports any more.
    assert_eq!(demo.interrupt(), Some(130), "{}", demo.stderr());
    assert!(demo.stderr().ends_with("keygate demo: Envoy and keygate serve stopped\n"), "{}", demo.stderr());
    for port in [ports.api, ports.admin, ports.serve] {
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err(), "port {port} still answers");
    }
    drop(demo);

    // Run again: the same keys, the usage so far kept, and a word that the reader key is revoked.
    let keys_env = std::fs::read_to_string(dir.join("keys.env")).unwrap();
    let keys_json = std::fs::read_to_string(dir.join("keys.json")).unwrap();
    let (mut again, printed) = Demo::start(&dir, &ports);
    assert!(
        printed.iter().any(|l| l
            == &format!(
                "Key {reader_id} was revoked in an earlier run, so step 1 answers 401 too. To start afresh: Ctrl-C,"
            )),
        "{printed:#?}"
    );
    assert_eq!(std::fs::read_to_string(dir.join("keys.env")).unwrap(), keys_env);
    assert_eq!(std::fs::read_to_string(dir.join("keys.json")).unwrap(), keys_json);
    let run = paste(&steps[4].command);
    assert_eq!(row(&run, &partner_id)[8], "4", "the usage of the first run: {run:#?}");
    assert_eq!(again.interrupt(), Some(130), "{}", again.stderr());
}
