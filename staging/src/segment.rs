//! Segment files: append-only JSON Lines, one envelope per line, each line sealed with a CRC-32
//! of its own bytes so a flipped bit is caught instead of delivered. This module encodes lines,
//! decodes them and scans a file into records, torn tail and damaged lines.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::value::RawValue;

use crate::crypt::{DataKey, KeyError, Keyring, SealedUnit};
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
pub fn read_file(path: &Path, keys: Option<&Keyring>) -> Result<Vec<Envelope>, StoreError> {
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
        let envelope = decode_line(line, keys).map_err(|e| match e {
            LineError::NeedsKey(kid) => StoreError::KeyNeeded {
                what: at(),
                kids: kid,
                why: "that key was not given".into(),
            },
            LineError::Damaged(reason) => StoreError::Damaged { what: at(), reason },
        })?;
        records.push(envelope);
    }
    if records.is_empty() {
        return Err(not_a_segment("it holds no record".into()));
    }
    Ok(records)
}

/// Encodes an envelope as one line, newline included: in clear, or sealed with `seal` (the
/// segment's data key).
pub fn encode_line(env: &Envelope, seal: Option<&mut DataKey>) -> Vec<u8> {
    match seal {
        None => {
            let mut line = serde_json::to_vec(env).expect("an envelope always serializes");
            finish_line(&mut line, 0);
            line
        }
        Some(dk) => {
            let counter = dk.reserve(1);
            encode_sealed_line(env, dk, counter)
        }
    }
}

/// Replaces the closing brace of the JSON object that starts at `start` in `buf` (and ends it)
/// with the CRC field, computed over the object before it, and ends the line.
fn finish_line(buf: &mut Vec<u8>, start: usize) {
    buf.pop();
    let crc = crc32fast::hash(&buf[start..]);
    buf.extend_from_slice(CRC_PREFIX);
    writeln!(buf, "{crc:08x}\"}}").expect("writing to a Vec cannot fail");
}

/// A sealed line: what the store needs for order and routing in clear, the rest sealed.
#[derive(serde::Serialize)]
pub struct SealedLine<'a> {
    #[serde(flatten)]
    head: ClearHead<'a>,
    sealed: SealedUnit,
}

/// What a sealed line keeps in clear, written before its `sealed` unit.
#[derive(serde::Serialize)]
struct ClearHead<'a> {
    v: u32,
    id: &'a str,
    seq: u64,
    action: &'a str,
    entity: &'a str,
    staged_at: &'a str,
    sinks: &'a [String],
}

/// The hidden part, borrowed from the envelope (the writer seals on its own thread: no copy).
#[derive(serde::Serialize)]
struct HiddenRef<'a> {
    key: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_key: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_fingerprint: &'a Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_records: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: &'a Option<crate::record::SourceMark>,
    payload: &'a RawValue,
}

/// A sealed line, newline included, with the nonce `counter` the caller reserved
/// ([`DataKey::reserve`]): lines can then be sealed on several threads.
pub fn encode_sealed_line(env: &Envelope, dk: &DataKey, counter: u64) -> Vec<u8> {
    let mut line = Vec::with_capacity(sealed_line_room(env));
    append_sealed_line(env, dk, counter, &mut Vec::new(), &mut line);
    line
}

/// Room to reserve for a sealed line of `env`, without counting it ([`sealed_line_len`]
/// counts): the payload's base64 and the clear head, about.
pub fn sealed_line_room(env: &Envelope) -> usize {
    env.payload.get().len() * 4 / 3 + 400
}

/// Appends to `out` the sealed line of `env` (newline included) with the reserved nonce
/// `counter`. `plain` is scratch space for the hidden part, reused from line to line, so a
/// group's sealing thread allocates neither the line nor its hidden part per line.
pub fn append_sealed_line(
    env: &Envelope,
    dk: &DataKey,
    counter: u64,
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
) {
    let start = out.len();
    plain.clear();
    serde_json::to_writer(&mut *plain, &hidden_ref(env)).expect("a record serializes");
    serde_json::to_writer(&mut *out, &clear_head(env)).expect("a record serializes");
    out.pop();
    out.extend_from_slice(SEALED_FIELD);
    let aad = envelope_aad(env);
    dk.seal_into_at(counter, plain, &aad, out);
    out.push(b'}');
    finish_line(out, start);
}

/// `,"sealed":`, between a sealed line's clear head and its sealed unit.
const SEALED_FIELD: &[u8] = b",\"sealed\":";

/// The length, newline included, of the line [`encode_sealed_line`] makes of `env` with `dk`
/// (whatever the nonce), without sealing it: the writer places and indexes a group's lines
/// while other threads seal them. Serializes the two JSON parts into a counter, nothing else.
pub fn sealed_line_len(env: &Envelope, dk: &DataKey) -> usize {
    let head = json_len(&clear_head(env)) - 1; // without its closing brace
    let plain = json_len(&hidden_ref(env));
    // `}` closing the line, dropped again by finish_line for the CRC field and `\n`.
    head + SEALED_FIELD.len() + dk.sealed_unit_len(plain) + CRC_SUFFIX_LEN + 1
}

/// The length of `value`'s compact JSON.
fn json_len(value: &impl serde::Serialize) -> usize {
    struct Count(usize);
    impl io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).expect("a record serializes");
    count.0
}

fn hidden_ref(env: &Envelope) -> HiddenRef<'_> {
    HiddenRef {
        key: &env.key,
        client_key: &env.client_key,
        client_fingerprint: &env.client_fingerprint,
        client_records: env.client_records,
        source: &env.source,
        payload: &env.payload,
    }
}

fn clear_head(env: &Envelope) -> ClearHead<'_> {
    ClearHead {
        v: env.v,
        id: &env.id,
        seq: env.seq,
        action: &env.action,
        entity: &env.entity,
        staged_at: &env.staged_at,
        sinks: &env.sinks,
    }
}

/// The part of a record a sealed line (or dead letter) hides.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hidden {
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_fingerprint: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    client_records: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<crate::record::SourceMark>,
    payload: Box<RawValue>,
}

/// [`line_aad`] of an envelope's clear fields.
fn envelope_aad(env: &Envelope) -> Vec<u8> {
    line_aad(
        env.v,
        &env.id,
        env.seq,
        &env.action,
        &env.entity,
        &env.staged_at,
        &env.sinks,
    )
}

/// The fields a sealed line keeps in clear, bound to its ciphertext: a line moved to another
/// place in the order, another entity or another sink does not open.
fn line_aad(
    v: u32,
    id: &str,
    seq: u64,
    action: &str,
    entity: &str,
    staged_at: &str,
    sinks: &[String],
) -> Vec<u8> {
    format!(
        "estafeta record v{v}\n{id}\n{seq}\n{action}\n{entity}\n{staged_at}\n{}",
        sinks.join(",")
    )
    .into_bytes()
}

pub fn seal_envelope<'a>(env: &'a Envelope, dk: &mut DataKey) -> SealedLine<'a> {
    let plain = serde_json::to_vec(&hidden_ref(env)).expect("a record serializes");
    SealedLine {
        head: clear_head(env),
        sealed: dk.seal(&plain, &envelope_aad(env)),
    }
}

/// A line or a dead letter's record as read: plain (the whole envelope) or sealed.
#[derive(Clone, serde::Deserialize)]
pub struct DiskRecord {
    v: u32,
    id: String,
    seq: u64,
    action: String,
    entity: String,
    #[serde(default)]
    key: Option<String>,
    staged_at: String,
    #[serde(default)]
    client_key: Option<String>,
    #[serde(default)]
    client_fingerprint: Option<String>,
    #[serde(default)]
    client_records: Option<u32>,
    sinks: Vec<String>,
    #[serde(default)]
    source: Option<crate::record::SourceMark>,
    /// `Some` for a plain record, whatever its payload (JSON `null` included).
    #[serde(default, deserialize_with = "present")]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    sealed: Option<SealedUnit>,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    <Box<RawValue> as serde::Deserialize>::deserialize(d).map(Some)
}

/// Why a line could not be read: damage, or a key this process does not have (never damage).
#[derive(Debug)]
pub enum LineError {
    Damaged(String),
    NeedsKey(String),
}

impl std::fmt::Display for LineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LineError::Damaged(reason) => f.write_str(reason),
            LineError::NeedsKey(kid) => write!(f, "sealed with key {kid}, which was not given"),
        }
    }
}

impl DiskRecord {
    /// `(seq, id, action, entity)`, which every record keeps in clear.
    pub fn clear_fields(&self) -> (u64, String, String, String) {
        (
            self.seq,
            self.id.clone(),
            self.action.clone(),
            self.entity.clone(),
        )
    }

    /// Opens a copy (the record itself is kept).
    pub fn clone_open(&self, keys: &Keyring) -> Result<Envelope, LineError> {
        self.clone().open(Some(keys))
    }

    /// A plain record's envelope (`None` when sealed).
    pub fn clone_open_plain(&self) -> Option<Envelope> {
        self.clone().open(None).ok()
    }

    /// The key id that sealed it, if sealed.
    pub fn kid(&self) -> Option<&str> {
        self.sealed.as_ref().map(|s| s.kid.as_str())
    }

    /// The envelope, opened with `keys` when sealed.
    pub fn open(self, keys: Option<&Keyring>) -> Result<Envelope, LineError> {
        let hidden = match (self.sealed, self.payload) {
            (None, Some(payload)) => Hidden {
                key: self.key,
                client_key: self.client_key,
                client_fingerprint: self.client_fingerprint,
                client_records: self.client_records,
                source: self.source,
                payload,
            },
            (None, None) => return Err(LineError::Damaged("record has no payload".into())),
            (Some(unit), _) => {
                let Some(keys) = keys else {
                    return Err(LineError::NeedsKey(unit.kid));
                };
                let aad = line_aad(
                    self.v,
                    &self.id,
                    self.seq,
                    &self.action,
                    &self.entity,
                    &self.staged_at,
                    &self.sinks,
                );
                let plain = keys.open(&unit, &aad).map_err(|e| match e {
                    KeyError::Missing(kid) => LineError::NeedsKey(kid),
                    KeyError::Forgotten { kid, dkid } => LineError::NeedsKey(format!(
                        "{kid} (data key {dkid}: not in _state/data-keys, forgotten when its segment was deleted, or that file was lost)"
                    )),
                    other => LineError::Damaged(other.to_string()),
                })?;
                serde_json::from_slice(&plain).map_err(|e| {
                    LineError::Damaged(format!("sealed content opens but is not a record: {e}"))
                })?
            }
        };
        Ok(Envelope {
            v: self.v,
            id: self.id,
            seq: self.seq,
            action: self.action,
            entity: self.entity,
            key: hidden.key,
            staged_at: self.staged_at,
            client_key: hidden.client_key,
            client_fingerprint: hidden.client_fingerprint,
            client_records: hidden.client_records,
            sinks: self.sinks,
            source: hidden.source,
            payload: hidden.payload,
        })
    }
}

/// Decodes one line (without its newline). The error says what is wrong with it.
pub fn decode_line(line: &[u8], keys: Option<&Keyring>) -> Result<Envelope, LineError> {
    let damaged = |s: &str| LineError::Damaged(s.to_string());
    if line.len() <= CRC_SUFFIX_LEN + 1 {
        return Err(damaged("line too short to be a record"));
    }
    let body_len = line.len() - CRC_SUFFIX_LEN;
    let (body, suffix) = line.split_at(body_len);
    if !suffix.starts_with(CRC_PREFIX) || !suffix.ends_with(b"\"}") {
        return Err(damaged("line does not end with its crc32 field"));
    }
    let hex = std::str::from_utf8(&suffix[CRC_PREFIX.len()..CRC_PREFIX.len() + 8])
        .map_err(|_| damaged("crc32 field is not text"))?;
    let want = u32::from_str_radix(hex, 16).map_err(|_| damaged("crc32 field is not hex"))?;
    let got = crc32fast::hash(body);
    if want != got {
        return Err(LineError::Damaged(format!(
            "checksum mismatch (stored {want:08x}, computed {got:08x}): the line was changed or damaged on disk"
        )));
    }
    let record: DiskRecord = serde_json::from_slice(line)
        .map_err(|e| LineError::Damaged(format!("checksum matches but JSON is invalid: {e}")))?;
    record.open(keys)
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
    /// A line sealed with a key this process lacks: the scan stops there, and the caller must
    /// change nothing (it is not damage).
    pub needs_key: Option<String>,
}

/// Scans `path` from `from` to its end.
pub fn scan(path: &Path, from: u64, keys: Option<&Keyring>) -> io::Result<Scan> {
    let mut f = File::open(path)?;
    f.seek(SeekFrom::Start(from))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(scan_bytes(&buf, from, keys))
}

/// Scans `buf`, which starts at file offset `base`.
pub fn scan_bytes(buf: &[u8], base: u64, keys: Option<&Keyring>) -> Scan {
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
            match decode_line(line, keys) {
                Ok(envelope) => out.records.push(ScannedRecord {
                    offset,
                    len,
                    envelope,
                }),
                Err(LineError::NeedsKey(kid)) => {
                    out.needs_key = Some(kid);
                    return out;
                }
                Err(LineError::Damaged(reason)) => out.damaged.push(DamagedLine {
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
pub fn read_record(
    path: &Path,
    offset: u64,
    len: u64,
    keys: Option<&Keyring>,
) -> Result<Envelope, LineError> {
    let mut f = File::open(path)
        .map_err(|e| LineError::Damaged(format!("cannot open {}: {e}", path.display())))?;
    read_record_from(&mut f, path, offset, len, keys)
}

/// Like [`read_record`], from a file the caller keeps open across records.
pub fn read_record_from(
    f: &mut File,
    path: &Path,
    offset: u64,
    len: u64,
    keys: Option<&Keyring>,
) -> Result<Envelope, LineError> {
    let buf = read_span(f, path, offset, len)?;
    decode_stored(&buf, keys)
}

/// Reads `len` bytes at `offset`: one record's line, or a run of consecutive lines (a lease
/// reads a batch's records of one segment in one call instead of two system calls each).
pub fn read_span(f: &mut File, path: &Path, offset: u64, len: u64) -> Result<Vec<u8>, LineError> {
    f.seek(SeekFrom::Start(offset))
        .map_err(|e| LineError::Damaged(format!("cannot seek in {}: {e}", path.display())))?;
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).map_err(|e| {
        LineError::Damaged(format!(
            "cannot read {len} bytes at offset {offset} of {}: {e} (was the file truncated?)",
            path.display()
        ))
    })?;
    Ok(buf)
}

/// Decodes one record's stored bytes (its line, newline included), checking its CRC.
pub fn decode_stored(stored: &[u8], keys: Option<&Keyring>) -> Result<Envelope, LineError> {
    match stored.split_last() {
        Some((b'\n', line)) => decode_line(line, keys),
        _ => Err(LineError::Damaged(
            "record does not end with a newline (file changed on disk)".into(),
        )),
    }
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
        let line = encode_line(&env(3), None);
        assert_eq!(line.last(), Some(&b'\n'));
        let back = decode_line(&line[..line.len() - 1], None).unwrap();
        assert_eq!(back.seq, 3);
        assert_eq!(back.payload.get(), r#"{"nome":"Ana","n":1.50}"#);
    }

    proptest::proptest! {
        /// The writer places and indexes sealed lines by the length it predicts before they are
        /// sealed: any difference would point the index at the wrong bytes.
        #[test]
        fn sealed_line_len_is_the_sealed_lines_length(
            key in proptest::option::of("\\PC{0,40}"),
            entity in "[a-z\"\\\\é]{1,12}",
            text in "\\PC{0,300}",
            client in proptest::option::of(("\\PC{1,20}", 1u32..300)),
            seq in 1u64..u64::MAX,
            counter in 1u64..1_000_000,
            named in proptest::bool::ANY,
        ) {
            let ring = crate::Keyring::generate();
            let dir = tempfile::tempdir().unwrap();
            let slots = std::sync::Arc::new(crate::data_keys::DataKeySlots::new(dir.path()));
            ring.attach(slots.clone());
            let dk = if named {
                ring.new_segment_data_key(&slots, "create/x/2026/12/07/a.jsonl").unwrap()
            } else {
                ring.new_data_key()
            };
            let mut e = env(seq);
            e.key = key;
            e.entity = entity;
            e.payload = RawValue::from_string(serde_json::to_string(&text).unwrap()).unwrap();
            if let Some((ck, n)) = client {
                e.client_fingerprint = Some(format!("fp-{ck}"));
                e.client_key = Some(ck);
                e.client_records = Some(n);
            }
            let line = encode_sealed_line(&e, &dk, counter);
            proptest::prop_assert_eq!(sealed_line_len(&e, &dk), line.len());
            let back = decode_line(&line[..line.len() - 1], Some(&ring)).unwrap();
            proptest::prop_assert_eq!(back.payload.get(), e.payload.get());
        }
    }

    #[test]
    fn flipped_byte_is_caught_by_the_checksum() {
        let mut line = encode_line(&env(3), None);
        let i = line.len() / 2;
        line[i] ^= 0x01;
        let err = decode_line(&line[..line.len() - 1], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("checksum") || err.contains("JSON"), "{err}");
    }

    #[test]
    fn scan_separates_records_damage_and_torn_tail() {
        let mut buf = encode_line(&env(1), None);
        let mut bad = encode_line(&env(2), None);
        bad[30] ^= 0x20;
        buf.extend_from_slice(&bad);
        buf.extend_from_slice(&encode_line(&env(3), None));
        let complete = buf.len() as u64;
        buf.extend_from_slice(&encode_line(&env(4), None)[..25]);
        let s = scan_bytes(&buf, 0, None);
        assert_eq!(
            s.records.iter().map(|r| r.envelope.seq).collect::<Vec<_>>(),
            vec![1, 3]
        );
        assert_eq!(s.damaged.len(), 1);
        assert_eq!(s.complete_len, complete);
        assert_eq!(s.torn_tail.len(), 25);
    }
}
