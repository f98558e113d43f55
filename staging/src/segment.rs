//! Segment files: append-only JSON Lines, one envelope per line, each line sealed with a CRC-32
//! of its own bytes so a flipped bit is caught instead of delivered. This module encodes lines,
//! decodes them and scans a file into records, torn tail and damaged lines.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::StoreError;
use crate::record::{Envelope, FORMAT_VERSION};

/// `,"crc32":"` + 8 hex digits + `"}`: the fixed tail of every line (before the newline).
const CRC_SUFFIX_LEN: usize = 20;
const CRC_PREFIX: &[u8] = b",\"crc32\":\"";

/// Only the format version of a line or dead letter (`{"v": N, …}`), read before the rest: a
/// newer format may have a shape this version cannot read.
#[derive(Debug, serde::Deserialize)]
pub struct FormatVersion {
    pub v: u32,
}

/// Refuses a file written in a format newer than [`FORMAT_VERSION`], with what to do.
pub fn check_format(path: &Path, found: u32) -> Result<(), StoreError> {
    if found > FORMAT_VERSION {
        return Err(StoreError::NewerFormat {
            path: path.to_path_buf(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}

/// Reads a whole segment file back, in file order, for a person or a tool: each line's format
/// version is checked first ([`StoreError::NewerFormat`]), then its checksum
/// ([`StoreError::Damaged`]). A file that holds no record lines is
/// [`StoreError::NotStagingFile`]; a torn last line (a write in progress) is left out.
pub fn read_file(path: &Path) -> Result<Vec<Envelope>, StoreError> {
    let bytes = std::fs::read(path).map_err(|e| StoreError::io("read", path, e))?;
    let not_a_segment = |reason: String| StoreError::NotStagingFile {
        path: path.to_path_buf(),
        expected: "segment",
        reason,
    };
    let mut records = Vec::new();
    // Complete lines only: bytes after the last newline are a record still being written.
    let complete = bytes
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(&bytes[..0], |end| &bytes[..end]);
    for (number, line) in complete.split(|&b| b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let at = || format!("{} line {}", path.display(), number + 1);
        let version: FormatVersion = serde_json::from_slice(line).map_err(|e| {
            not_a_segment(format!(
                "line {} is not a staged record ({e}); expected a segment (one record per line) or a dead-letter file",
                number + 1
            ))
        })?;
        check_format(path, version.v)?;
        let envelope =
            decode_line(line).map_err(|reason| StoreError::Damaged { what: at(), reason })?;
        records.push(envelope);
    }
    if records.is_empty() {
        return Err(not_a_segment("it holds no record".into()));
    }
    Ok(records)
}

/// Encodes an envelope as one line, newline included.
pub fn encode_line(env: &Envelope) -> Vec<u8> {
    let mut line = serde_json::to_vec(env).expect("an envelope always serializes");
    // Replace the closing brace with the CRC field, computed over everything before it.
    line.pop();
    let crc = crc32fast::hash(&line);
    line.extend_from_slice(CRC_PREFIX);
    line.extend_from_slice(format!("{crc:08x}\"}}\n").as_bytes());
    line
}

/// Decodes one line (without its newline). The error says what is wrong with it.
pub fn decode_line(line: &[u8]) -> Result<Envelope, String> {
    if line.len() <= CRC_SUFFIX_LEN + 1 {
        return Err("line too short to be a record".into());
    }
    let body_len = line.len() - CRC_SUFFIX_LEN;
    let (body, suffix) = line.split_at(body_len);
    if !suffix.starts_with(CRC_PREFIX) || !suffix.ends_with(b"\"}") {
        return Err("line does not end with its crc32 field".into());
    }
    let hex = std::str::from_utf8(&suffix[CRC_PREFIX.len()..CRC_PREFIX.len() + 8])
        .map_err(|_| "crc32 field is not text".to_string())?;
    let want = u32::from_str_radix(hex, 16).map_err(|_| "crc32 field is not hex".to_string())?;
    let got = crc32fast::hash(body);
    if want != got {
        return Err(format!(
            "checksum mismatch (stored {want:08x}, computed {got:08x}): the line was changed or damaged on disk"
        ));
    }
    serde_json::from_slice(line).map_err(|e| format!("checksum matches but JSON is invalid: {e}"))
}

/// A record found while scanning a segment.
#[derive(Debug)]
pub struct ScannedRecord {
    pub offset: u64,
    pub len: u64,
    pub envelope: Envelope,
}

/// A line that could not be decoded.
#[derive(Debug)]
pub struct DamagedLine {
    pub offset: u64,
    pub bytes: Vec<u8>,
    pub reason: String,
}

/// What a scan found from some offset to the end of a file.
#[derive(Debug, Default)]
pub struct Scan {
    pub records: Vec<ScannedRecord>,
    pub damaged: Vec<DamagedLine>,
    /// Offset where the complete lines end: bytes past it are a torn tail (no newline yet).
    pub complete_len: u64,
    /// The torn tail's bytes, if any.
    pub torn_tail: Vec<u8>,
}

/// Scans `path` from `from` to its end.
pub fn scan(path: &Path, from: u64) -> io::Result<Scan> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(scan_bytes(&buf, from))
}

/// Scans `buf`, which starts at file offset `base`.
pub fn scan_bytes(buf: &[u8], base: u64) -> Scan {
    let mut out = Scan {
        complete_len: base,
        ..Scan::default()
    };
    let mut start = 0usize;
    while start < buf.len() {
        let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') else {
            out.torn_tail = buf[start..].to_vec();
            break;
        };
        let line = &buf[start..start + nl];
        let offset = base + start as u64;
        let len = nl as u64 + 1;
        if line.iter().all(|b| b.is_ascii_whitespace() || *b == 0) {
            // Blank or zero-filled: a crash after the size grew but before data landed.
            if !line.is_empty() {
                out.damaged.push(DamagedLine {
                    offset,
                    bytes: line.to_vec(),
                    reason: "line of zeros or blanks (a write that never completed)".into(),
                });
            }
        } else {
            match decode_line(line) {
                Ok(envelope) => out.records.push(ScannedRecord {
                    offset,
                    len,
                    envelope,
                }),
                Err(reason) => out.damaged.push(DamagedLine {
                    offset,
                    bytes: line.to_vec(),
                    reason,
                }),
            }
        }
        start += nl + 1;
        out.complete_len = base + start as u64;
    }
    out
}

/// Reads one record back from its segment, checking its CRC.
pub fn read_record(path: &Path, offset: u64, len: u64) -> Result<Envelope, String> {
    let mut f = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    read_record_from(&mut f, path, offset, len)
}

/// Like [`read_record`], from a file the caller keeps open across records.
pub fn read_record_from(
    f: &mut File,
    path: &Path,
    offset: u64,
    len: u64,
) -> Result<Envelope, String> {
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| format!("cannot seek in {}: {e}", path.display()))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(|e| {
        format!(
            "cannot read {len} bytes at offset {offset} of {}: {e} (was the file truncated?)",
            path.display()
        )
    })?;
    if buf.last() != Some(&b'\n') {
        return Err("record does not end with a newline (file changed on disk)".into());
    }
    buf.pop();
    decode_line(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::value::RawValue;

    fn env(seq: u64) -> Envelope {
        Envelope {
            v: 1,
            id: format!("id-{seq}"),
            seq,
            action: "create".into(),
            entity: "patient".into(),
            key: Some("7".into()),
            staged_at: "2026-11-23T08:00:00.000000Z".into(),
            client_key: None,
            client_fingerprint: None,
            client_records: None,
            sinks: vec!["db".into()],
            source: None,
            payload: RawValue::from_string(r#"{"nome":"Ana","n":1.50}"#.into()).unwrap(),
        }
    }

    #[test]
    fn line_round_trips_and_keeps_payload_bytes() {
        let line = encode_line(&env(3));
        assert_eq!(line.last(), Some(&b'\n'));
        let back = decode_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back.seq, 3);
        assert_eq!(back.payload.get(), r#"{"nome":"Ana","n":1.50}"#);
    }

    #[test]
    fn flipped_byte_is_caught_by_the_checksum() {
        let mut line = encode_line(&env(3));
        let i = line.len() / 2;
        line[i] ^= 0x01;
        let err = decode_line(&line[..line.len() - 1]).unwrap_err();
        assert!(err.contains("checksum") || err.contains("JSON"), "{err}");
    }

    #[test]
    fn scan_separates_records_damage_and_torn_tail() {
        let mut buf = encode_line(&env(1));
        let mut bad = encode_line(&env(2));
        bad[30] ^= 0x20;
        buf.extend_from_slice(&bad);
        buf.extend_from_slice(&encode_line(&env(3)));
        let complete = buf.len() as u64;
        buf.extend_from_slice(&encode_line(&env(4))[..25]);
        let s = scan_bytes(&buf, 0);
        assert_eq!(
            s.records.iter().map(|r| r.envelope.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(s.damaged.len(), 1);
        assert_eq!(s.complete_len, complete);
        assert_eq!(s.torn_tail.len(), 25);
    }
}
