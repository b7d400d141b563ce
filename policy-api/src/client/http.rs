//! HTTP/1.1 as the client speaks it: one request with a JSON body per
//! connection, the response read to the end (or line by line, for a
//! streamed one).

use std::io::{Read, Write};

use serde_json::Value;

use super::{ClientError, Response};

/// One HTTP/1.1 request with a JSON body on its own connection, and its
/// JSON response.
pub(super) fn exchange(
    stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Response, ClientError> {
    let payload = body.map(Value::to_string).unwrap_or_default();
    exchange_bytes(stream, host, method, path, payload.as_bytes())
}

/// [`exchange`] with the body's JSON already written out.
pub(super) fn exchange_bytes(
    mut stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    payload: &[u8],
) -> Result<Response, ClientError> {
    write_request(&mut stream, host, method, path, payload)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn write_request(
    stream: &mut impl Write,
    host: &str,
    method: &str,
    path: &str,
    payload: &[u8],
) -> Result<(), ClientError> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    // One write when small (a request in one segment), two otherwise (no
    // copy of a large body).
    if payload.len() <= 4096 {
        stream.write_all(&[head.as_bytes(), payload].concat())?;
    } else {
        stream.write_all(head.as_bytes())?;
        stream.write_all(payload)?;
    }
    Ok(())
}

/// Sends a request and calls `on_line` with each line of the body as it
/// arrives (a streamed, chunked response) until the server ends it or
/// `on_line` returns false. Returns the HTTP status.
pub(super) fn stream_lines(
    mut stream: impl Read + Write,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&Value>,
    mut on_line: impl FnMut(&str) -> bool,
) -> Result<u16, ClientError> {
    use std::io::{BufRead as _, BufReader};
    let payload = body.map(Value::to_string).unwrap_or_default();
    write_request(&mut stream, host, method, path, payload.as_bytes())?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Malformed(format!("bad status line {line:?}")))?;
    let mut chunked = false;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        chunked |= line.to_ascii_lowercase().starts_with("transfer-encoding: chunked");
    }
    let mut pending = Vec::new();
    let mut emit = |pending: &mut Vec<u8>| -> bool {
        while let Some(end) = pending.iter().position(|b| *b == b'\n') {
            let text = String::from_utf8_lossy(&pending[..end]).into_owned();
            pending.drain(..=end);
            if !on_line(&text) {
                return false;
            }
        }
        true
    };
    if !chunked {
        reader.read_to_end(&mut pending)?;
        pending.push(b'\n');
        emit(&mut pending);
        return Ok(status);
    }
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(status);
        }
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| ClientError::Malformed(format!("bad chunk size {line:?}")))?;
        if size == 0 {
            return Ok(status);
        }
        let mut chunk = vec![0u8; size + 2];
        reader.read_exact(&mut chunk)?;
        pending.extend_from_slice(&chunk[..size]);
        if !emit(&mut pending) {
            return Ok(status);
        }
    }
}

fn parse_response(raw: &[u8]) -> Result<Response, ClientError> {
    let (status, body) = split_response(raw).map_err(ClientError::Malformed)?;
    let body = if body.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Malformed(format!("body is not JSON: {e}")))?
    };
    Ok(Response { status, body })
}

/// A whole HTTP/1.1 response as read to the end of its connection: its
/// status and its body (de-chunked). Any server's, not only the agent's
/// (the agent reads Cloud Foundry's policy server with it).
pub fn split_response(raw: &[u8]) -> Result<(u16, Vec<u8>), String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| "no end of headers".to_owned())?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = raw[split + 4..].to_vec();
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    if head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding: chunked")) {
        body = dechunk(&body)?;
    }
    Ok((status, body))
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let line_end =
            data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| "bad chunk".to_owned())?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| "bad chunk size".to_owned())?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = data.get(..size).ok_or_else(|| "short chunk".to_owned())?;
        out.extend_from_slice(chunk);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 15\r\n\r\n{\"error\":\"no\"}";
        let r = parse_response(plain).unwrap();
        assert_eq!((r.status, r.error()), (400, "no".to_owned()));
        let chunked = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap().body["a"], 1);
    }
}
