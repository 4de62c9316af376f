//! Clients that send requests exactly as written: no path normalisation, duplicate headers kept.
//! HTTP/1.1 is a plain std `TcpStream`; HTTP/2 is cleartext prior knowledge (h2c) through the `h2`
//! crate on a per-call current-thread tokio runtime.

use std::io::{BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use super::http1;

/// How long a client waits for a connection or a reply before failing.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Http1,
    Http2,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::Http1, Proto::Http2];
}

/// A reply as the client received it. Header names are lowercase.
#[derive(Clone, Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }
}

/// `send` with method GET and no body.
pub fn get(port: u16, proto: Proto, path: &str, headers: &[(&str, &str)]) -> Response {
    send(port, proto, "GET", path, headers)
}

/// Sends one request with no body on a fresh connection to 127.0.0.1:`port`; panics on a
/// transport failure (use [`try_send`] to observe resets / closed connections).
pub fn send(port: u16, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    send_body(port, proto, method, path, headers, b"")
}

/// `send` with a body (HTTP/1.1 adds `content-length` unless `headers` already has one or the
/// body is empty).
pub fn send_body(port: u16, proto: Proto, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
    try_send(port, proto, method, path, headers, body).unwrap_or_else(|e| panic!("{proto:?} {method} {path}: {e}"))
}

/// Sends one request on a fresh connection. HTTP/1.1: a `host: 127.0.0.1:<port>` header is
/// added unless `headers` has a `host`. HTTP/2: a `host` (or `:authority`) entry in `headers`
/// becomes `:authority` (default `127.0.0.1:<port>`); every other entry is sent as a header, the
/// name lowercased (h2 requires it). `Err` on a transport or protocol failure (a reset stream, a
/// closed connection, a header the h2 crate refuses to send).
pub fn try_send(
    port: u16,
    proto: Proto,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Response, String> {
    match proto {
        Proto::Http1 => {
            let mut req = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
                req.extend_from_slice(format!("host: 127.0.0.1:{port}\r\n").as_bytes());
            }
            for (n, v) in headers {
                req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            let has_len = headers
                .iter()
                .any(|(n, _)| n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding"));
            if !body.is_empty() && !has_len {
                req.extend_from_slice(format!("content-length: {}\r\n", body.len()).as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            req.extend_from_slice(body);
            try_raw_http1(port, &req)
        }
        Proto::Http2 => h2_send(port, method, path, headers, body, &[]),
    }
}

/// Sends one request with a body and then `trailers`, on a fresh connection, as [`try_send`]
/// does otherwise. HTTP/1.1: the body is one chunk (none when empty) of a chunked message, the
/// trailers in its trailer section. HTTP/2: a HEADERS frame, the body's DATA frame (none when
/// empty), and the trailers in a second HEADERS frame that ends the stream (names lowercased).
pub fn try_send_with_trailers(
    port: u16,
    proto: Proto,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    trailers: &[(&str, &str)],
) -> Result<Response, String> {
    match proto {
        Proto::Http1 => {
            let mut req = format!("{method} {path} HTTP/1.1\r\n").into_bytes();
            if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
                req.extend_from_slice(format!("host: 127.0.0.1:{port}\r\n").as_bytes());
            }
            for (n, v) in headers {
                req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            req.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
            if !body.is_empty() {
                req.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
                req.extend_from_slice(body);
                req.extend_from_slice(b"\r\n");
            }
            req.extend_from_slice(b"0\r\n");
            for (n, v) in trailers {
                req.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
            }
            req.extend_from_slice(b"\r\n");
            try_raw_http1(port, &req)
        }
        Proto::Http2 => h2_send(port, method, path, headers, body, trailers),
    }
}

/// Writes `request` verbatim to a fresh connection and parses one HTTP/1.x reply (interim 1xx
/// replies are skipped). Panics if no reply can be read.
pub fn raw_http1(port: u16, request: &[u8]) -> Response {
    try_raw_http1(port, request)
        .unwrap_or_else(|e| panic!("raw HTTP/1.1 request {:?}: {e}", String::from_utf8_lossy(request)))
}

/// [`raw_http1`] that returns `Err` (for example when Envoy closes the connection with no reply).
pub fn try_raw_http1(port: u16, request: &[u8]) -> Result<Response, String> {
    let stream = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), CLIENT_TIMEOUT)
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    stream.set_read_timeout(Some(CLIENT_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT)).map_err(|e| e.to_string())?;
    let head_request = request.starts_with(b"HEAD ");
    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
    writer.write_all(request).map_err(|e| format!("write: {e}"))?;
    let mut reader = BufReader::new(stream);
    loop {
        let head = http1::read_head(&mut reader)
            .map_err(|e| format!("reading reply head: {e}"))?
            .ok_or("connection closed with no reply")?;
        let status: u16 = head
            .start_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {:?}", head.start_line))?;
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        let body = http1::read_response_body(&mut reader, &head, status, head_request)
            .map_err(|e| format!("reading reply body: {e}"))?;
        return Ok(Response { status, headers: head.headers, body: String::from_utf8_lossy(&body).into_owned() });
    }
}

fn h2_send(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    trailers: &[(&str, &str)],
) -> Result<Response, String> {
    let mut authority = format!("127.0.0.1:{port}");
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(method.as_bytes()).map_err(|e| format!("method {method:?}: {e}"))?)
        .version(http::Version::HTTP_2);
    for (n, v) in headers {
        if n.eq_ignore_ascii_case("host") || n.eq_ignore_ascii_case(":authority") {
            authority = (*v).to_string();
            continue;
        }
        let name = http::HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("header name {n:?}: {e}"))?;
        let value = http::HeaderValue::from_bytes(v.as_bytes()).map_err(|e| format!("header value {v:?}: {e}"))?;
        builder = builder.header(name, value);
    }
    let uri = http::Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
        .map_err(|e| format!("uri with authority {authority:?} and path {path:?}: {e}"))?;
    // The http crate drops a fragment (`#...`); refuse rather than send something else.
    let sent = uri.path_and_query().map_or("/", http::uri::PathAndQuery::as_str);
    if sent != path {
        return Err(format!("the h2 client cannot send the path {path:?} unchanged (it would send {sent:?})"));
    }
    let request = builder.uri(uri).body(()).map_err(|e| e.to_string())?;
    let body = bytes::Bytes::copy_from_slice(body);
    let mut trailer_map = http::HeaderMap::new();
    for (n, v) in trailers {
        let name = http::HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("trailer name {n:?}: {e}"))?;
        let value = http::HeaderValue::from_bytes(v.as_bytes()).map_err(|e| format!("trailer value {v:?}: {e}"))?;
        trailer_map.append(name, value);
    }

    let rt =
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let exchange = async move {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
            let (client, connection) = h2::client::handshake(tcp).await.map_err(|e| format!("h2 handshake: {e}"))?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut client = client.ready().await.map_err(|e| format!("h2 ready: {e}"))?;
            let end_with_headers = body.is_empty() && trailer_map.is_empty();
            let (reply, mut stream) =
                client.send_request(request, end_with_headers).map_err(|e| format!("h2 send_request: {e}"))?;
            if !body.is_empty() {
                stream.send_data(body, trailer_map.is_empty()).map_err(|e| format!("h2 send_data: {e}"))?;
            }
            if !trailer_map.is_empty() {
                stream.send_trailers(trailer_map).map_err(|e| format!("h2 send_trailers: {e}"))?;
            }
            let reply = reply.await.map_err(|e| format!("h2 reply: {e}"))?;
            let (parts, mut recv) = reply.into_parts();
            let mut data = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.map_err(|e| format!("h2 body: {e}"))?;
                let _ = recv.flow_control().release_capacity(chunk.len());
                data.extend_from_slice(&chunk);
            }
            let headers = parts
                .headers
                .iter()
                .map(|(n, v)| (n.as_str().to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                .collect();
            Ok(Response { status: parts.status.as_u16(), headers, body: String::from_utf8_lossy(&data).into_owned() })
        };
        tokio::time::timeout(CLIENT_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("h2: no reply within {CLIENT_TIMEOUT:?}"))?
    })
}
