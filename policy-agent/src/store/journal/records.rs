//! The journal's lines: the header naming the snapshot it follows, and
//! records `SEQ CRC32 {"change":...}` (or, in the first format, JSON lines
//! without checksums); written, parsed and checked here.

use serde::{Deserialize, Serialize};

use crate::store::Change;

/// The first line of a journal: the snapshot seq it follows is appended.
pub(super) const HEADER: &str = "policy-agent journal 2 after ";

/// A record's JSON (after its seq and checksum).
#[derive(Deserialize)]
struct Body {
    change: Change,
}

/// A journal line of the first format (no checksum), still read.
#[derive(Deserialize)]
struct LegacyEntry {
    seq: u64,
    change: Change,
}

/// What the journal holds, read and checked.
pub(super) struct Read {
    /// The snapshot seq the header names (0 for a legacy journal).
    pub(super) after: u64,
    /// The first format: no header, JSON lines without checksums.
    pub(super) legacy: bool,
    /// Whole records, in order: (seq, change).
    pub(super) records: Vec<(u64, Change)>,
    /// Length of the header and whole records.
    pub(super) whole_len: u64,
    /// File length.
    pub(super) len: u64,
    /// The first damage found (records stop before it).
    pub(super) damage: Option<String>,
}

/// A record's line: `SEQ CRC {"change":...}\n`.
pub(super) fn record(seq: u64, change: &Change) -> Vec<u8> {
    #[derive(Serialize)]
    struct BodyRef<'a> {
        change: &'a Change,
    }
    let json = serde_json::to_vec(&BodyRef { change }).expect("changes serialize");
    let crc = checksum(seq, &json);
    let mut line = format!("{seq} {crc:08x} ").into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn checksum(seq: u64, json: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(seq.to_string().as_bytes());
    h.update(b" ");
    h.update(json);
    h.finalize()
}

/// Parses one whole record line.
fn parse_record(line: &[u8]) -> Result<(u64, Change), String> {
    if line.first() == Some(&b'{') {
        let e: LegacyEntry =
            serde_json::from_slice(line).map_err(|e| format!("not a record: {e}"))?;
        return Ok((e.seq, e.change));
    }
    let mut parts = line.splitn(3, |b| *b == b' ');
    let (Some(seq), Some(crc), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a record".into());
    };
    let seq: u64 = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("not a record (no sequence number)")?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or(format!("record {seq} has no checksum"))?;
    if checksum(seq, json) != crc {
        return Err(format!("record {seq} fails its checksum"));
    }
    let body: Body =
        serde_json::from_slice(json).map_err(|e| format!("record {seq} does not parse: {e}"))?;
    Ok((seq, body.change))
}

/// Splits a journal into its header, whole records and torn tail.
pub(super) fn parse(bytes: &[u8]) -> Read {
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut read = Read {
        after: 0,
        legacy: bytes.is_empty() || bytes[0] == b'{',
        records: Vec::new(),
        whole_len: whole as u64,
        len: bytes.len() as u64,
        damage: None,
    };
    let mut lines = bytes[..whole].split_inclusive(|b| *b == b'\n').map(|l| &l[..l.len() - 1]);
    let mut line_no = 0;
    if !read.legacy {
        // A journal is created with its header at once (renamed into place).
        let Some(header) = lines.next() else {
            read.damage = Some(if bytes.iter().all(|b| *b == 0) {
                format!("{} NUL bytes and no header line", bytes.len())
            } else {
                "no header line".into()
            });
            return read;
        };
        line_no = 1;
        match std::str::from_utf8(header).ok().and_then(|h| h.strip_prefix(HEADER)?.parse().ok()) {
            Some(after) => read.after = after,
            None => {
                read.damage = Some("line 1 is not the journal's header".into());
                return read;
            }
        }
    }
    for line in lines {
        line_no += 1;
        match parse_record(line) {
            Ok(r) => read.records.push(r),
            Err(e) => {
                read.damage = Some(format!("line {line_no}: {e}"));
                break;
            }
        }
    }
    read
}
