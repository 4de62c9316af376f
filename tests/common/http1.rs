//! A small HTTP/1.1 message reader shared by the recording upstream (requests) and the clients
//! (responses). It keeps what was received as received: header names are lowercased, values are
//! trimmed of surrounding blanks and converted lossily to UTF-8, duplicates stay separate entries in
//! arrival order. A chunked body's trailer fields are read the same way.

use std::io::{self, BufRead};

/// Trailer fields: (name lowercased, value), in arrival order, as `Head::headers`.
pub type Fields = Vec<(String, String)>;

/// The start line and the header fields of one message.
pub struct Head {
    pub start_line: String,
    pub headers: Vec<(String, String)>,
}

impl Head {
    /// Every value of the header `name` (case-insensitive), in arrival order.
    pub fn values(&self, name: &str) -> Vec<&str> {
        self.headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str()).collect()
    }

    /// Whether the message's body is chunked (the last transfer-coding is `chunked`).
    pub fn chunked(&self) -> bool {
        self.values("transfer-encoding")
            .iter()
            .flat_map(|v| v.split(','))
            .next_back()
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
    }

    pub fn content_length(&self) -> io::Result<Option<usize>> {
        match self.values("content-length").first() {
            None => Ok(None),
            Some(v) => v.trim().parse().map(Some).map_err(|_| invalid(format!("bad content-length {v:?}"))),
        }
    }
}

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Reads one line ending in LF (a CR before it is dropped). `Ok(None)` on EOF before any byte.
fn read_line(r: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = r.read_until(b'\n', &mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed mid-line"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(line))
}

/// Reads a start line and header fields. `Ok(None)` when the peer closed before sending a byte.
pub fn read_head(r: &mut impl BufRead) -> io::Result<Option<Head>> {
    let Some(start) = read_line(r)? else {
        return Ok(None);
    };
    let mut headers = Vec::new();
    loop {
        let line = read_line(r)?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed in headers"))?;
        if line.is_empty() {
            break;
        }
        headers.push(field(&line)?);
    }
    Ok(Some(Head { start_line: String::from_utf8_lossy(&start).into_owned(), headers }))
}

/// One header (or trailer) field line: the name lowercased, the value trimmed of blanks.
fn field(line: &[u8]) -> io::Result<(String, String)> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| invalid(format!("header line without colon: {:?}", String::from_utf8_lossy(line))))?;
    let (name, value) = line.split_at(colon);
    let value = trim_blanks(value.get(1..).unwrap_or_default());
    Ok((String::from_utf8_lossy(name).to_ascii_lowercase(), String::from_utf8_lossy(value).into_owned()))
}

fn trim_blanks(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

/// Reads a chunked body and its trailer fields (names lowercased, as [`read_head`] reads headers).
fn read_chunked(r: &mut impl BufRead) -> io::Result<(Vec<u8>, Fields)> {
    let mut body = Vec::new();
    loop {
        let line = read_line(r)?.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "eof in chunked body"))?;
        let line = String::from_utf8_lossy(&line);
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size, 16).map_err(|_| invalid(format!("bad chunk size {size:?}")))?;
        if size == 0 {
            // Trailer section, ended by an empty line.
            let mut trailers = Vec::new();
            while let Some(l) = read_line(r)? {
                if l.is_empty() {
                    break;
                }
                trailers.push(field(&l)?);
            }
            return Ok((body, trailers));
        }
        let start = body.len();
        body.resize(start + size, 0);
        r.read_exact(&mut body[start..])?;
        read_line(r)?;
    }
}

/// Reads a request body: chunked, Content-Length, or none.
pub fn read_request_body(r: &mut impl BufRead, head: &Head) -> io::Result<Vec<u8>> {
    read_request_body_and_trailers(r, head).map(|(body, _)| body)
}

/// Reads a request body and, when it is chunked, its trailer fields (none otherwise).
pub fn read_request_body_and_trailers(r: &mut impl BufRead, head: &Head) -> io::Result<(Vec<u8>, Fields)> {
    if head.chunked() {
        return read_chunked(r);
    }
    let len = head.content_length()?.unwrap_or(0);
    let mut body = vec![0; len];
    r.read_exact(&mut body)?;
    Ok((body, Vec::new()))
}

/// Reads a response body: none for HEAD / 1xx / 204 / 304, else chunked, Content-Length, or
/// everything up to EOF.
pub fn read_response_body(r: &mut impl BufRead, head: &Head, status: u16, head_request: bool) -> io::Result<Vec<u8>> {
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Vec::new());
    }
    if head.chunked() {
        return read_chunked(r).map(|(body, _)| body);
    }
    match head.content_length()? {
        Some(len) => {
            let mut body = vec![0; len];
            r.read_exact(&mut body)?;
            Ok(body)
        }
        None => {
            let mut body = Vec::new();
            r.read_to_end(&mut body)?;
            Ok(body)
        }
    }
}
