//! `keygate serve`: an HTTP/1.1 server for one machine or a demo, which serves a published key set
//! ([`files`]) and keeps the usage reports filters send ([`store`], read by [`crate::report`]).
//!
//! This module is the HTTP glue only: hyper's HTTP/1.1 server on a single-threaded tokio runtime,
//! whose few blocking threads (at most [`BLOCKING_THREADS`]) read files and append reports, so a
//! slow disk or a slow client never holds the thread that accepts and answers. What it bounds:
//!
//! - at most [`MAX_CONNECTIONS`] connections at once (more wait in the kernel's backlog);
//! - a request's headers must arrive within [`HEADER_TIMEOUT`] (hyper closes the connection
//!   otherwise, idle keep-alive connections too), and at most [`MAX_HEADER_BYTES`] of them;
//! - a report's body within [`BODY_TIMEOUT`] (`408`), at most [`MAX_REPORT`] bytes (`413`), and
//!   at most [`BODY_READERS`] bodies are read at once, so at most that many reports are in memory;
//! - a write that makes no progress for [`WRITE_TIMEOUT`] closes the connection, so a client
//!   that stops reading does not keep its slot.
//!
//! One line per request goes to standard error; never a body, a query string or a header. SIGINT
//! and SIGTERM stop accepting, let the requests under way finish (for up to [`DRAIN_TIMEOUT`]),
//! then exit.

mod files;
mod store;

pub use store::USAGE_FILE;

use crate::report;
use files::{KeySetDir, Lookup};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use store::{Stored, UsageStore};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Semaphore};

/// Where usage reports are posted.
pub const USAGE_PATH: &str = "/usage";
/// The largest usage report accepted.
pub const MAX_REPORT: usize = 8 << 20;
pub const MAX_CONNECTIONS: u32 = 64;
pub const BODY_READERS: usize = 4;
pub const BLOCKING_THREADS: usize = 4;
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
pub const MAX_HEADER_BYTES: usize = 64 << 10;
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What `keygate serve` was asked to do.
#[derive(Debug)]
pub struct Options {
    pub keys: PathBuf,
    pub usage_dir: PathBuf,
    pub listen: SocketAddr,
}

struct State {
    dir: KeySetDir,
    store: Mutex<UsageStore>,
    body_readers: Semaphore,
}

/// A line on standard error, never a panic (even with standard error closed).
fn log(line: &str) {
    let _ = writeln!(std::io::stderr(), "keygate serve: {line}");
}

/// Serves until SIGINT or SIGTERM.
pub fn run(options: &Options) -> Result<(), String> {
    let dir = KeySetDir::open(&options.keys)?;
    let store = UsageStore::open(&options.usage_dir)?;
    let listener = std::net::TcpListener::bind(options.listen)
        .and_then(|l| l.set_nonblocking(true).map(|()| l))
        .map_err(|e| format!("--listen {}: cannot listen: {}", options.listen, crate::keyset::io_reason(&e)))?;
    let address = listener.local_addr().map_err(|e| format!("cannot read the address listened on: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(BLOCKING_THREADS)
        .build()
        .map_err(|e| format!("cannot start: {e}"))?;
    log(&format!(
        "listening on http://{address}: GET /manifest.json and the rest of {}, POST {USAGE_PATH} into {} ({} reports)",
        options.keys.display(),
        store.path().display(),
        store.reports()
    ));
    let state = Arc::new(State { dir, store: Mutex::new(store), body_readers: Semaphore::new(BODY_READERS) });
    runtime.block_on(accept(listener, state))
}

/// Resolves at SIGINT or SIGTERM.
async fn stop_signal() -> Result<(), String> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| format!("cannot watch for SIGTERM: {e}"))?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| format!("cannot watch for SIGINT: {e}"))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

async fn accept(listener: std::net::TcpListener, state: Arc<State>) -> Result<(), String> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| format!("cannot listen: {e}"))?;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS as usize));
    let (shutdown, _) = watch::channel(false);
    let mut stop = pin!(stop_signal());
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.map_err(|e| format!("internal: {e}"))?,
            stopped = &mut stop => { stopped?; break; }
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, say: try again shortly rather than stop serving.
                    log(&format!("cannot accept a connection: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            stopped = &mut stop => { stopped?; break; }
        };
        let state = state.clone();
        let mut shutdown = shutdown.subscribe();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(state.clone(), req, peer));
            let mut builder = http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(HEADER_TIMEOUT).max_buf_size(MAX_HEADER_BYTES);
            let mut conn = pin!(builder.serve_connection(TokioIo::new(Timed::new(stream)), service));
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.changed() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.as_mut().await;
                }
            }
            drop(slot);
        });
    }
    log("stopping: finishing the requests under way");
    let _ = shutdown.send(true);
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, slots.acquire_many(MAX_CONNECTIONS)).await.is_err() {
        log(&format!("stopped with requests still under way after {DRAIN_TIMEOUT:?}"));
    }
    Ok(())
}

/// An answer, before it becomes hyper's response.
struct Reply {
    status: StatusCode,
    body: Bytes,
    headers: Vec<(HeaderName, String)>,
}

impl Reply {
    fn json(status: StatusCode, body: serde_json::Value) -> Reply {
        let mut text = body.to_string();
        text.push('\n');
        Reply {
            status,
            body: Bytes::from(text),
            headers: vec![(hyper::header::CONTENT_TYPE, "application/json".into())],
        }
    }

    fn error(status: StatusCode, message: &str) -> Reply {
        Reply::json(status, serde_json::json!({"error": message}))
    }

    fn refused_report(status: StatusCode, message: &str) -> Reply {
        Reply::json(status, serde_json::json!({"accepted": false, "error": message}))
    }

    fn with(mut self, name: HeaderName, value: &str) -> Reply {
        self.headers.push((name, value.to_string()));
        self
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() = self.status;
        for (name, value) in self.headers {
            // Every value made here is visible ASCII; one that were not would be left out.
            if let Ok(value) = HeaderValue::from_str(&value) {
                response.headers_mut().insert(name, value);
            }
        }
        response
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let reply = if path == USAGE_PATH {
        match method {
            Method::POST => receive(&state, req).await,
            _ => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "POST a usage report here")
                .with(hyper::header::ALLOW, "POST"),
        }
    } else {
        match method {
            Method::GET | Method::HEAD => fetch(&state, &path, &req).await,
            _ => Reply::error(StatusCode::METHOD_NOT_ALLOWED, "the key set is read with GET")
                .with(hyper::header::ALLOW, "GET, HEAD"),
        }
    };
    log(&format!(
        "{peer} {method} {} {} {} bytes {} ms",
        shown_path(&path),
        reply.status.as_u16(),
        reply.body.len(),
        started.elapsed().as_millis()
    ));
    Ok(reply.into_response())
}

/// A path as a log line shows it: visible ASCII (anything else as `?`), at most 200 characters.
fn shown_path(path: &str) -> String {
    let mut shown: String = path.chars().take(200).map(|c| if c.is_ascii_graphic() { c } else { '?' }).collect();
    if path.chars().nth(200).is_some() {
        shown.push('…');
    }
    shown
}

async fn fetch(state: &Arc<State>, path: &str, req: &Request<Incoming>) -> Reply {
    let if_none_match =
        req.headers().get(hyper::header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).map(str::to_string);
    let (state, path) = (state.clone(), path.to_string());
    let found = tokio::task::spawn_blocking(move || state.dir.get(&path, if_none_match.as_deref())).await;
    match found {
        Ok(Lookup::File { body, etag }) => Reply {
            status: StatusCode::OK,
            body: Bytes::from(body),
            headers: vec![
                (hyper::header::CONTENT_TYPE, "application/json".into()),
                (hyper::header::ETAG, etag),
                (hyper::header::CACHE_CONTROL, "no-cache".into()),
            ],
        },
        Ok(Lookup::NotModified { etag }) => Reply {
            status: StatusCode::NOT_MODIFIED,
            body: Bytes::new(),
            headers: vec![(hyper::header::ETAG, etag), (hyper::header::CACHE_CONTROL, "no-cache".into())],
        },
        Ok(Lookup::NotFound) => Reply::error(StatusCode::NOT_FOUND, "no such file in the key set"),
        Ok(Lookup::Unreadable) | Err(_) => Reply::error(StatusCode::INTERNAL_SERVER_ERROR, "the file cannot be read"),
    }
}

async fn receive(state: &Arc<State>, req: Request<Incoming>) -> Reply {
    let too_large = || {
        Reply::refused_report(StatusCode::PAYLOAD_TOO_LARGE, &format!("a report is at most {MAX_REPORT} bytes"))
            .with(hyper::header::CONNECTION, "close")
    };
    let announced = req.headers().get(hyper::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_REPORT as u64) {
        return too_large();
    }
    let read = async {
        let _reading = state.body_readers.acquire().await;
        Limited::new(req.into_body(), MAX_REPORT).collect().await
    };
    let body = match tokio::time::timeout(BODY_TIMEOUT, read).await {
        Err(_) => {
            return Reply::refused_report(StatusCode::REQUEST_TIMEOUT, "the report did not arrive in time")
                .with(hyper::header::CONNECTION, "close")
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => return too_large(),
        Ok(Err(_)) => return Reply::refused_report(StatusCode::BAD_REQUEST, "the body could not be read"),
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let state = state.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let report = report::parse(&body).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let mut store = state.store.lock().map_err(|_| (StatusCode::INTERNAL_SERVER_ERROR, "internal".to_string()))?;
        store.store(&report).map_err(|e| {
            log(&e);
            (StatusCode::INTERNAL_SERVER_ERROR, "the report could not be stored".to_string())
        })
    })
    .await;
    match stored {
        Ok(Ok(Stored::Accepted)) => Reply::json(StatusCode::OK, serde_json::json!({"accepted": true})),
        Ok(Ok(Stored::Duplicate)) => {
            Reply::json(StatusCode::OK, serde_json::json!({"accepted": false, "duplicate": true}))
        }
        Ok(Err((status, message))) => Reply::refused_report(status, &message),
        Err(_) => Reply::refused_report(StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    }
}

/// A connection whose writes fail once they make no progress for [`WRITE_TIMEOUT`].
struct Timed {
    stream: tokio::net::TcpStream,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Timed {
    fn new(stream: tokio::net::TcpStream) -> Timed {
        Timed { stream, stalled: None }
    }

    /// `poll` of a write: progress resets the clock; no progress for too long is an error.
    fn progress<T>(&mut self, cx: &mut Context<'_>, poll: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(WRITE_TIMEOUT)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "the client stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Timed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Timed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.progress(cx, poll)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.progress(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.progress(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_path_is_visible_ascii_and_short() {
        assert_eq!(shown_path("/manifest.json"), "/manifest.json");
        assert_eq!(shown_path("/a b/caf\u{e9}\n"), "/a?b/caf??");
        let long = format!("/{}", "x".repeat(300));
        assert_eq!(shown_path(&long).chars().count(), 201);
    }
}
