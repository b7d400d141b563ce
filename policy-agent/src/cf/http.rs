//! HTTP/1.1 answers as the policy server's client reads them off a kept
//! connection: where an answer ends (RFC 9112 section 6.3), so that the
//! next request can go on the same connection. Go's net/http server (the
//! policy server's) sends a `Content-Length` for a short body and
//! `Transfer-Encoding: chunked` for one it did not buffer whole (above
//! 2 KiB); either way, or until the server closes. Every part is bounded
//! (the header section, a chunk's size line, the body at the caller's
//! cap), so a broken or hostile server cannot make the agent allocate
//! without limit; no length it states is allocated before it arrives.

use std::io::{self, BufRead, Read as _};

/// The most bytes of a status line and its headers (again for a chunked
/// body's trailers): the policy server's answers carry a handful.
pub const MAX_HEAD_BYTES: u64 = 64 << 10;

/// The longest chunk-size line, extensions included (Go's reader allows
/// 4 KiB too).
const MAX_CHUNK_LINE_BYTES: u64 = 4 << 10;

/// A whole answer, read to its end and no further.
#[derive(Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: Vec<u8>,
    /// Whether the next request may go on this connection: the server
    /// did not say it closes, and the body's end was framed (a body read
    /// to the close leaves nothing to reuse).
    pub reusable: bool,
}

#[derive(Debug)]
pub enum ReadError {
    /// Not a byte of the answer arrived: the connection ended or failed
    /// first (the request's writing too, for the client). On a kept
    /// connection: the server closed it while idle.
    NoAnswer(io::Error),
    /// The connection failed partway through the answer.
    Io(io::Error),
    /// The bytes are no HTTP/1.x answer, or break a bound.
    Malformed(String),
}

/// How the body's end is found.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// No body (1xx, 204, 304).
    Empty,
    Length(u64),
    Chunked,
    /// Read until the server closes.
    Close,
}

/// What a status line and its headers say.
struct Head {
    status: u16,
    framing: Framing,
    /// The server closes after this answer.
    close: bool,
}

/// Reads one answer from `reader`, its body at most `max_body` bytes (a
/// chunked body's as sent: its chunk lines count too).
pub fn read_answer(reader: &mut impl BufRead, max_body: u64) -> Result<Answer, ReadError> {
    let mut budget = MAX_HEAD_BYTES;
    let mut head = read_head(reader, &mut budget, true)?;
    // 1xx: an interim answer (none is asked for); the final one follows.
    while (100..200).contains(&head.status) {
        head = read_head(reader, &mut budget, false)?;
    }
    let too_large = || malformed(format!("the answer is larger than {}", size(max_body)));
    let body = match head.framing {
        Framing::Empty => Vec::new(),
        Framing::Length(length) if length > max_body => return Err(too_large()),
        Framing::Length(length) => {
            let mut body = Vec::new();
            read_onto(reader, length, &mut body, "body")?;
            body
        }
        Framing::Chunked => read_chunked(reader, max_body)?,
        Framing::Close => {
            let mut body = Vec::new();
            // One byte more than the limit: enough to tell it was passed.
            match reader.take(max_body + 1).read_to_end(&mut body) {
                // A close without TLS's close_notify (Go sends one, but a
                // cut connection may not) ends it too: the body is then
                // checked by its parse.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Err(ReadError::Io(e)),
                Ok(_) => {}
            }
            if body.len() as u64 > max_body {
                return Err(too_large());
            }
            body
        }
    };
    let reusable = !head.close && head.framing != Framing::Close;
    Ok(Answer { status: head.status, body, reusable })
}

/// A status line and its headers, from `budget` bytes (which they use
/// up). The `first` head of an answer tells a connection that ended
/// before answering from one that ended within.
fn read_head(reader: &mut impl BufRead, budget: &mut u64, first: bool) -> Result<Head, ReadError> {
    let status_line = if first {
        let mut line = Vec::new();
        match reader.take(*budget).read_until(b'\n', &mut line) {
            Ok(0) => {
                let closed =
                    io::Error::new(io::ErrorKind::UnexpectedEof, "closed before answering");
                return Err(ReadError::NoAnswer(closed));
            }
            Err(e) if line.is_empty() => return Err(ReadError::NoAnswer(e)),
            Err(e) => return Err(ReadError::Io(e)),
            Ok(read) => *budget -= read as u64,
        }
        end_line(line, *budget, "header section")?
    } else {
        read_line(reader, budget, "header section")?
    };
    let (http_1_0, status) = parse_status_line(&status_line)?;
    let (mut lengths, mut codings) = (Vec::new(), Vec::new());
    let (mut close, mut keep_alive) = (false, false);
    loop {
        let line = read_line(reader, budget, "header section")?;
        if line.is_empty() {
            break;
        }
        let (name, value) = parse_field(&line)?;
        let list = value.split(',').map(|item| item.trim().to_ascii_lowercase());
        match name.to_ascii_lowercase().as_str() {
            "content-length" => lengths.extend(list),
            "transfer-encoding" => codings.extend(list),
            "connection" => {
                for token in list {
                    close |= token == "close";
                    keep_alive |= token == "keep-alive";
                }
            }
            _ => {}
        }
    }
    let framing = framing(status, &lengths, &codings)?;
    // HTTP/1.0 closes unless it says otherwise; a length beside chunked
    // (chunked counts) leaves the connection not to be trusted with
    // another request (RFC 9112 section 6.1).
    close |= (http_1_0 && !keep_alive) || (!lengths.is_empty() && !codings.is_empty());
    Ok(Head { status, framing, close })
}

/// `HTTP/1.1 200 OK`: whether it is HTTP/1.0, and the status.
fn parse_status_line(line: &[u8]) -> Result<(bool, u16), ReadError> {
    let text = std::str::from_utf8(line).map_err(|_| malformed(quoted("status line", line)))?;
    let mut parts = text.splitn(3, ' ');
    let http_1_0 = match parts.next() {
        Some("HTTP/1.1") => false,
        Some("HTTP/1.0") => true,
        _ => return Err(malformed(quoted("status line (not HTTP/1.x)", line))),
    };
    let status = parts
        .next()
        .filter(|code| code.len() == 3 && code.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|code| code.parse().ok())
        .filter(|code| (100..600).contains(code))
        .ok_or_else(|| malformed(quoted("status line", line)))?;
    Ok((http_1_0, status))
}

/// `Name: value`. A continuation line (obsolete folding) is refused, as
/// RFC 9112 section 5.2 allows.
fn parse_field(line: &[u8]) -> Result<(&str, &str), ReadError> {
    let bad = || malformed(quoted("header", line));
    let text = std::str::from_utf8(line).map_err(|_| bad())?;
    let (name, value) = text.split_once(':').ok_or_else(bad)?;
    if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(bad());
    }
    Ok((name, value.trim()))
}

/// Where the body ends (RFC 9112 section 6.3): none for 1xx, 204 and
/// 304; chunked if the transfer coding says so; the length if one is
/// given (repeated, it must agree); else at the close.
fn framing(status: u16, lengths: &[String], codings: &[String]) -> Result<Framing, ReadError> {
    if (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok(Framing::Empty);
    }
    if !codings.is_empty() {
        // No Accept-Encoding is sent: a coding other than chunked (gzip
        // under it) would be a body this client cannot read.
        if codings.iter().any(|c| c != "chunked") || codings.len() > 1 {
            return Err(malformed(format!("unsupported Transfer-Encoding {}", codings.join(", "))));
        }
        return Ok(Framing::Chunked);
    }
    let Some(first) = lengths.first() else {
        return Ok(Framing::Close);
    };
    let length = parse_length(first)?;
    if lengths.iter().any(|l| l != first) {
        return Err(malformed(format!("Content-Length disagrees: {}", lengths.join(", "))));
    }
    Ok(Framing::Length(length))
}

fn parse_length(text: &str) -> Result<u64, ReadError> {
    // Digits only: `u64::from_str` would take a sign.
    if text.is_empty() || text.len() > 19 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(malformed(format!("Content-Length {text:?} is no length")));
    }
    text.parse().map_err(|_| malformed(format!("Content-Length {text:?} is no length")))
}

/// A chunked body (RFC 9112 section 7.1): size lines in hex (extensions
/// after `;` ignored), each chunk followed by CRLF, a last chunk of size
/// 0, then trailers (read and ignored) up to an empty line.
fn read_chunked(reader: &mut impl BufRead, max_body: u64) -> Result<Vec<u8>, ReadError> {
    let too_large = || malformed(format!("the answer is larger than {}", size(max_body)));
    let mut body = Vec::new();
    // The body as sent: data, size lines, CRLFs.
    let mut left = max_body;
    loop {
        let mut line_budget = MAX_CHUNK_LINE_BYTES;
        let line = read_line(reader, &mut line_budget, "chunk size line")?;
        left = left.checked_sub(MAX_CHUNK_LINE_BYTES - line_budget).ok_or_else(too_large)?;
        let chunk = parse_chunk_size(&line)?;
        if chunk == 0 {
            break;
        }
        left = left.checked_sub(chunk.saturating_add(2)).ok_or_else(too_large)?;
        read_onto(reader, chunk, &mut body, "chunk")?;
        let mut end = Vec::new();
        read_onto(reader, 2, &mut end, "chunk")?;
        if end != b"\r\n" {
            return Err(malformed("a chunk is longer than its size line says".to_owned()));
        }
    }
    let mut trailers = MAX_HEAD_BYTES;
    loop {
        let line = read_line(reader, &mut trailers, "trailer section")?;
        if line.is_empty() {
            return Ok(body);
        }
        parse_field(&line)?;
    }
}

/// `1a2b;name=value`: the size before any extension.
fn parse_chunk_size(line: &[u8]) -> Result<u64, ReadError> {
    let digits = line.split(|b| *b == b';').next().unwrap_or_default();
    let digits = digits.trim_ascii();
    // 16 hex digits hold any u64.
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(malformed(quoted("chunk size line", line)));
    }
    let text = std::str::from_utf8(digits).map_err(|_| malformed(quoted("chunk size", line)))?;
    u64::from_str_radix(text, 16).map_err(|_| malformed(quoted("chunk size line", line)))
}

/// `length` more bytes onto `data` (checked against the cap already:
/// `data` grows as they arrive, never to a size only claimed).
fn read_onto(
    reader: &mut impl BufRead,
    length: u64,
    data: &mut Vec<u8>,
    what: &str,
) -> Result<(), ReadError> {
    let before = data.len();
    match reader.take(length).read_to_end(data) {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => return Err(ReadError::Io(e)),
        _ => {}
    }
    let read = (data.len() - before) as u64;
    if read < length {
        return Err(malformed(format!(
            "the connection closed within a {what}: {read} of {length} bytes"
        )));
    }
    Ok(())
}

/// One line, without its CRLF (a bare LF also ends it), of at most
/// `budget` bytes, which it uses up.
fn read_line(
    reader: &mut impl BufRead,
    budget: &mut u64,
    what: &str,
) -> Result<Vec<u8>, ReadError> {
    let mut line = Vec::new();
    match reader.take(*budget).read_until(b'\n', &mut line) {
        Err(e) if e.kind() != io::ErrorKind::UnexpectedEof => return Err(ReadError::Io(e)),
        _ => {}
    }
    *budget -= line.len() as u64;
    end_line(line, *budget, what)
}

/// `line` without its end; an error if it has none: it took the whole
/// budget (`left` is 0), or the connection closed.
fn end_line(mut line: Vec<u8>, left: u64, what: &str) -> Result<Vec<u8>, ReadError> {
    if line.last() != Some(&b'\n') {
        return Err(malformed(if left == 0 {
            format!("the {what} is longer than its limit")
        } else {
            format!("the connection closed within the {what}")
        }));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(line)
}

fn malformed(cause: String) -> ReadError {
    ReadError::Malformed(cause)
}

/// What was wrong, with the start of the bytes.
fn quoted(what: &str, bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(100)];
    format!("bad {what} {:?}", String::from_utf8_lossy(shown))
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 { format!("{} MiB", bytes >> 20) } else { format!("{bytes} bytes") }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(raw: &[u8], max_body: u64) -> Result<Answer, ReadError> {
        read_answer(&mut &raw[..], max_body)
    }

    /// The cause of a malformed answer; panics on any other outcome.
    fn refused(raw: &[u8], max_body: u64) -> String {
        match read(raw, max_body) {
            Err(ReadError::Malformed(cause)) => cause,
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(raw)),
        }
    }

    #[test]
    fn answers_end_where_their_framing_says() {
        // The answer as sent (then the next one's start, `NEXT`, unread
        // unless the body is read to the close), its status, its body,
        // whether the connection is reusable after it.
        const NEXT: &[u8] = b"HTTP/1.1 ";
        let cases: [(&[u8], u16, &[u8], bool); 12] = [
            (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 13\r\n\r\n1700000000000",
                200,
                b"1700000000000",
                true,
            ),
            // Repeated, agreeing: one length.
            (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\ncontent-length: 2\r\n\r\nok", 200, b"ok", true),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;name=value\r\n{\"a\"\r\nA ; x\r\n:[1,2,3,4]\r\n1\r\n}\r\n0;last\r\nExpires: never\r\nX-Trailer: 1\r\n\r\n",
                200,
                b"{\"a\":[1,2,3,4]}",
                true,
            ),
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n0\r\n\r\n", 200, b"", true),
            // Both: chunked counts, and the connection is not reused.
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                200,
                b"ok",
                false,
            ),
            (
                b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\nContent-Length: 4\r\n\r\noops",
                500,
                b"oops",
                false,
            ),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", false),
            (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 2\r\n\r\nok", 200, b"ok", true),
            (b"HTTP/1.1 204 No Content\r\n\r\n", 204, b"", true),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n7", 200, b"7", true),
            // Bare LFs end lines too.
            (b"HTTP/1.1 200 OK\nContent-Length: 1\n\n7", 200, b"7", true),
            // Neither length nor chunked: to the close, `NEXT` with it.
            (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nall\r\nof it", 200, b"all\r\nof itHTTP/1.1 ", false),
        ];
        for (sent, status, body, reusable) in cases {
            let raw = [sent, NEXT].concat();
            let mut reader = &raw[..];
            let got = read_answer(&mut reader, 100)
                .unwrap_or_else(|e| panic!("{:?}: {e:?}", String::from_utf8_lossy(sent)));
            let expected = Answer { status, body: body.to_vec(), reusable };
            assert_eq!(got, expected, "{:?}", String::from_utf8_lossy(sent));
            let unread: &[u8] = if body.ends_with(NEXT) { b"" } else { NEXT };
            assert_eq!(reader, unread, "{:?}", String::from_utf8_lossy(sent));
        }
    }

    #[test]
    fn nothing_at_all_is_no_answer() {
        assert!(
            matches!(read(b"", 100), Err(ReadError::NoAnswer(e)) if e.kind() == io::ErrorKind::UnexpectedEof)
        );
        // One byte is an answer begun: cut, it is malformed, not retried.
        let cause = refused(b"H", 100);
        assert!(cause.contains("closed within the header section"), "{cause}");
    }

    #[test]
    fn malformed_answers_are_named() {
        for (raw, says) in [
            (&b"SSH-2.0-OpenSSH\r\n\r\n"[..], "not HTTP/1.x"),
            (b"HTTP/1.1 20 OK\r\n\r\n", "bad status line"),
            (b"HTTP/1.1 abc OK\r\n\r\n", "bad status line"),
            (b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n", "bad header"),
            (b"HTTP/1.1 200 OK\r\n folded: x\r\n\r\n", "bad header"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "is no length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx", "is no length"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\nx", "disagrees"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "is no length"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "unsupported"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "5 of 10 bytes"),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n", "closed within the header"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n", "bad chunk size"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000000\r\n",
                "bad chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokay\r\n",
                "longer than its size",
            ),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok", "2 of 5 bytes"),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
                "closed within the chunk size",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nbad trailer\r\n\r\n",
                "bad header",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n",
                "closed within the trailer",
            ),
        ] {
            let cause = refused(raw, 1000);
            assert!(
                cause.contains(says),
                "{:?}: {cause:?}, not {says:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn bodies_are_capped_in_every_framing() {
        let length = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n0123456789a";
        assert_eq!(read(length, 11).unwrap().body, b"0123456789a");
        assert!(refused(length, 10).contains("larger than 10 bytes"));
        // A length far beyond what arrives is refused before any read.
        let huge = b"HTTP/1.1 200 OK\r\nContent-Length: 9999999999999999999\r\n\r\n";
        assert!(refused(huge, 1 << 20).contains("larger than 1 MiB"));
        let close = b"HTTP/1.1 200 OK\r\n\r\n0123456789a";
        assert_eq!(read(close, 11).unwrap().body, b"0123456789a");
        assert!(refused(close, 10).contains("larger than 10 bytes"));
        // Chunked: the body as sent, 3 + 4 and 3 + 5 bytes of its
        // chunks, 3 of its last.
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n01\r\n3\r\n234\r\n0\r\n\r\n";
        assert_eq!(read(chunked, 18).unwrap().body, b"01234");
        assert!(refused(chunked, 17).contains("larger than 17 bytes"));
        let claims = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n";
        assert!(refused(claims, 1 << 20).contains("larger than 1 MiB"));
    }

    #[test]
    fn heads_and_chunk_lines_are_bounded() {
        let mut long = b"HTTP/1.1 200 OK\r\n".to_vec();
        while (long.len() as u64) <= MAX_HEAD_BYTES {
            long.extend_from_slice(b"X-Filler: 0123456789012345678901234567890123456789\r\n");
        }
        long.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        assert!(refused(&long, 100).contains("header section is longer than its limit"));
        let endless = vec![b'H'; MAX_HEAD_BYTES as usize + 10];
        assert!(refused(&endless, 100).contains("header section is longer than its limit"));
        let mut extension = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        extension.extend(vec![b'x'; MAX_CHUNK_LINE_BYTES as usize]);
        extension.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert!(refused(&extension, 1 << 20).contains("chunk size line is longer than its limit"));
        let mut trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n".to_vec();
        while (trailers.len() as u64) <= 2 * MAX_HEAD_BYTES {
            trailers.extend_from_slice(b"X-Trailer: 0123456789012345678901234567890123456789\r\n");
        }
        assert!(refused(&trailers, 1 << 20).contains("trailer section is longer than its limit"));
    }

    #[test]
    fn an_io_failure_partway_is_not_a_missing_answer() {
        /// Gives `data`, then fails.
        struct Cut<'a>(&'a [u8]);
        impl io::Read for Cut<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                if self.0.is_empty() {
                    return Err(io::ErrorKind::ConnectionReset.into());
                }
                let n = buf.len().min(self.0.len());
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut nothing = io::BufReader::new(Cut(b""));
        assert!(
            matches!(read_answer(&mut nothing, 100), Err(ReadError::NoAnswer(e)) if e.kind() == io::ErrorKind::ConnectionReset)
        );
        let mut partway =
            io::BufReader::new(Cut(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"));
        assert!(
            matches!(read_answer(&mut partway, 100), Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::ConnectionReset)
        );
    }
}
