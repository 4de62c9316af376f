//! The recording upstream: a plain-thread HTTP/1.1 server on 127.0.0.1 (OS-picked port) that
//! answers every request `200 {"upstream":"ok"}` and records what it received, a chunked request's
//! trailers included.

use std::io::{BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::http1;

/// The body every upstream reply carries.
pub const UPSTREAM_BODY: &str = r#"{"upstream":"ok"}"#;

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    /// The request target exactly as received (path and query, not normalised).
    pub path: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Header fields in arrival order, names lowercased, duplicates as separate entries.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Trailer fields of a chunked request, as `headers`; empty for any other request.
    pub trailers: Vec<(String, String)>,
}

impl Recorded {
    /// Every value of header `name` (case-insensitive), in arrival order.
    pub fn header_values(&self, name: &str) -> Vec<String> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone()).collect()
    }

    /// The first value of header `name`, if any.
    pub fn header(&self, name: &str) -> Option<String> {
        self.header_values(name).into_iter().next()
    }

    /// Whether header `name` is present at all.
    pub fn has_header(&self, name: &str) -> bool {
        self.headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name))
    }
}

#[derive(Default)]
struct State {
    requests: Mutex<Vec<Recorded>>,
    stop: AtomicBool,
    conns: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

/// A recording HTTP/1.1 upstream. Stops (every thread joined) on Drop.
pub struct Upstream {
    port: u16,
    state: Arc<State>,
    accept: Option<JoinHandle<()>>,
}

impl Upstream {
    pub fn start() -> Upstream {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("upstream: bind 127.0.0.1:0");
        let port = listener.local_addr().expect("upstream: local_addr").port();
        let state = Arc::new(State::default());
        let st = Arc::clone(&state);
        let accept = std::thread::Builder::new()
            .name(format!("upstream-{port}"))
            .spawn(move || accept_loop(listener, st))
            .expect("upstream: spawn accept thread");
        Upstream { port, state, accept: Some(accept) }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every request received so far, in the order they were complete.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("upstream lock").clone()
    }

    /// The only request received so far; panics (listing them) when there is not exactly one.
    pub fn single_request(&self) -> Recorded {
        let reqs = self.requests();
        match reqs.as_slice() {
            [one] => one.clone(),
            _ => panic!("upstream: expected exactly one request, got {}: {reqs:#?}", reqs.len()),
        }
    }

    pub fn clear(&self) {
        self.state.requests.lock().expect("upstream lock").clear();
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        let conns = std::mem::take(&mut *self.state.conns.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        for (stream, _) in &conns {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, handle) in conns {
            let _ = handle.join();
        }
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
        let mut conns = state.conns.lock().expect("upstream lock");
        // Forget connections that are already finished so the list stays short.
        conns.retain(|(_, h)| !h.is_finished());
        conns.push((clone, handle));
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
        let mut parts = head.start_line.splitn(3, ' ');
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let version = parts.next().unwrap_or_default().to_string();
        let Ok((body, trailers)) = http1::read_request_body_and_trailers(&mut reader, &head) else {
            return;
        };
        let head_request = method == "HEAD";
        let close = version != "HTTP/1.1" || head.values("connection").iter().any(|v| v.eq_ignore_ascii_case("close"));
        state.requests.lock().expect("upstream lock").push(Recorded {
            method,
            path,
            version,
            headers: head.headers,
            body,
            trailers,
        });
        let reply = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{}",
            UPSTREAM_BODY.len(),
            if close { "connection: close\r\n" } else { "" },
            if head_request { "" } else { UPSTREAM_BODY }
        );
        if writer.write_all(reply.as_bytes()).is_err() || close {
            return;
        }
    }
}
