//! One segment file of the log: the on-disk frame format, encoding and decoding of records,
//! recovery scans and the sparse offset → byte position index.
//!
//! This file owns the bytes on disk. It never decides *which* segment to write to, never
//! fsyncs on its own initiative except after cutting a torn tail during recovery, and never
//! trusts a length, count or offset read from a file before checking it against what is there.
//!
//! # On-disk format
//!
//! A log directory holds segment files named `{base_offset:020}.seg`, where `base_offset` is
//! the offset of the first record the segment holds (or will hold, if it is empty). Segments
//! are contiguous: each one starts at the offset where the previous one ends. A segment is a
//! sequence of frames and nothing else (no file header, no footer):
//!
//! ```text
//! frame = u32 LE body_len | u32 LE crc32(body) | body                  (crc32fast, IEEE)
//! body  = u64 LE offset
//!       | i64 LE timestamp_ms
//!       | u32 LE key_len          (u32::MAX = NULL key, then no key bytes)
//!       | key                     (key_len bytes)
//!       | u32 LE header_count
//!       | header_count × ( u16 LE name_len | name (UTF-8) | u32 LE value_len | value )
//!       | payload                 (the rest of the body, possibly empty)
//! ```
//!
//! The smallest body (no key, no headers, empty payload) is [`MIN_BODY_BYTES`] = 24 bytes, so a
//! run of zero bytes (as left by some file systems after a crash) never passes as a frame even
//! though `crc32("") == 0`. The frame header is not covered by the checksum; a damaged
//! `body_len` shows up as a body that is too short, runs past the end of the file, or fails
//! the checksum.
//!
//! Frame offsets within a segment are consecutive, starting at the segment's base offset.
//! A record whose body exceeds the configured `record_bytes_max` is never written.

use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use super::log::{LogError, NewRecord, Record};

/// Bytes of the frame header: `u32 body_len | u32 crc`.
pub(crate) const FRAME_HEADER_BYTES: u64 = 8;

/// Smallest possible body: offset, timestamp, key_len and header_count.
pub(crate) const MIN_BODY_BYTES: u64 = 8 + 8 + 4 + 4;

/// `key_len` value that marks a NULL key.
const NULL_KEY_LEN: u32 = u32::MAX;

/// Distance in bytes between two entries of a segment's sparse index. A read starts at most
/// this many bytes (plus one frame) before the record it wants.
const INDEX_INTERVAL_BYTES: u64 = 4096;

/// Bytes read from a file at once when scanning a whole segment during recovery.
pub(crate) const SCAN_CHUNK_BYTES: usize = 1 << 20;

/// File name of the segment starting at `base_offset`.
pub(crate) fn segment_file_name(base_offset: u64) -> String {
    format!("{base_offset:020}.seg")
}

/// Parses a segment file name back into its base offset; `None` for any other file.
pub(crate) fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Body length of `record` once encoded, computed in `u64` so that no input can overflow it.
/// Also returns the longest header name, which the format limits to `u16::MAX` bytes.
pub(crate) fn encoded_body_bytes(record: &NewRecord) -> (u64, usize) {
    let key = record.key.as_ref().map_or(0, |k| k.len() as u64);
    let mut headers = 0u64;
    let mut longest_name = 0usize;
    for (name, value) in &record.headers {
        headers += 2 + name.len() as u64 + 4 + value.len() as u64;
        longest_name = longest_name.max(name.len());
    }
    (
        MIN_BODY_BYTES + key + headers + record.payload.len() as u64,
        longest_name,
    )
}

/// A frame encoded without its offset, so that the costly part (copying and checksumming the
/// body) happens before the appender takes the writer lock; [`EncodedBatch::assign_offsets`]
/// patches the offset in and completes the checksum under the lock.
pub(crate) struct EncodedBatch {
    /// All frames back to back, offsets and checksums still zero until assigned.
    pub(crate) buf: Vec<u8>,
    /// Per frame: start within `buf`, checksum of the body after the offset field, timestamp.
    frames: Vec<PendingFrame>,
}

struct PendingFrame {
    start: usize,
    crc_after_offset: crc32fast::Hasher,
    timestamp_ms: i64,
}

impl EncodedBatch {
    /// Encodes `records`. The caller has already checked every size against the limits, so
    /// each body fits in `u32` and each header name in `u16`.
    pub(crate) fn encode(records: &[NewRecord]) -> EncodedBatch {
        let total: u64 = records
            .iter()
            .map(|r| FRAME_HEADER_BYTES + encoded_body_bytes(r).0)
            .sum();
        let mut buf = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        let mut frames = Vec::with_capacity(records.len());
        for record in records {
            let start = buf.len();
            let (body_bytes, _) = encoded_body_bytes(record);
            let body_len = u32::try_from(body_bytes).expect("caller checked record_bytes_max");
            buf.extend_from_slice(&body_len.to_le_bytes());
            buf.extend_from_slice(&[0; 4]); // crc, filled in by assign_offsets
            buf.extend_from_slice(&[0; 8]); // offset, filled in by assign_offsets
            let after_offset = buf.len();
            buf.extend_from_slice(&record.timestamp_ms.to_le_bytes());
            match &record.key {
                None => buf.extend_from_slice(&NULL_KEY_LEN.to_le_bytes()),
                Some(key) => {
                    let len = u32::try_from(key.len()).expect("body fits in u32");
                    buf.extend_from_slice(&len.to_le_bytes());
                    buf.extend_from_slice(key);
                }
            }
            let count = u32::try_from(record.headers.len()).expect("body fits in u32");
            buf.extend_from_slice(&count.to_le_bytes());
            for (name, value) in &record.headers {
                let name_len = u16::try_from(name.len()).expect("caller checked header names");
                buf.extend_from_slice(&name_len.to_le_bytes());
                buf.extend_from_slice(name.as_bytes());
                let value_len = u32::try_from(value.len()).expect("body fits in u32");
                buf.extend_from_slice(&value_len.to_le_bytes());
                buf.extend_from_slice(value);
            }
            buf.extend_from_slice(&record.payload);
            debug_assert_eq!((buf.len() - start) as u64, FRAME_HEADER_BYTES + body_bytes);
            let mut crc_after_offset = crc32fast::Hasher::new();
            crc_after_offset.update(&buf[after_offset..]);
            frames.push(PendingFrame {
                start,
                crc_after_offset,
                timestamp_ms: record.timestamp_ms,
            });
        }
        EncodedBatch { buf, frames }
    }

    /// Number of frames in the batch.
    pub(crate) fn len(&self) -> usize {
        self.frames.len()
    }

    /// Writes offsets `first_offset..` into the frames and completes their checksums.
    pub(crate) fn assign_offsets(&mut self, first_offset: u64) {
        for (i, frame) in self.frames.iter().enumerate() {
            let offset = first_offset + i as u64;
            let offset_bytes = offset.to_le_bytes();
            let mut crc = crc32fast::Hasher::new();
            crc.update(&offset_bytes);
            crc.combine(&frame.crc_after_offset);
            let start = frame.start;
            self.buf[start + 4..start + 8].copy_from_slice(&crc.finalize().to_le_bytes());
            self.buf[start + 8..start + 16].copy_from_slice(&offset_bytes);
        }
    }

    /// Per frame: (start within `buf`, timestamp), for updating a segment's index.
    fn frame_positions(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.frames.iter().map(|f| (f.start as u64, f.timestamp_ms))
    }
}

/// Reads a bounds-checked body field by field.
struct BodyCursor<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> BodyCursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<Range<usize>, String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.body.len())
            .ok_or_else(|| {
                format!(
                    "{what} of {n} bytes at body byte {} runs past the body of {} bytes",
                    self.pos,
                    self.body.len()
                )
            })?;
        let range = self.pos..end;
        self.pos = end;
        Ok(range)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let range = self.take(N, what)?;
        Ok(self.body[range]
            .try_into()
            .expect("take returned exactly N bytes"))
    }

    fn u16(&mut self, what: &str) -> Result<u16, String> {
        self.array(what).map(u16::from_le_bytes)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn i64(&mut self, what: &str) -> Result<i64, String> {
        self.array(what).map(i64::from_le_bytes)
    }
}

/// The parts of a body every reader needs, found without allocating.
struct BodyLayout {
    offset: u64,
    timestamp_ms: i64,
    key: Option<Range<usize>>,
    payload_start: usize,
}

/// Walks a body, checking every length against the bytes present and every header name for
/// UTF-8, and calls `on_header` for each header. Errors describe what is malformed.
fn walk_body<'a>(
    body: &'a [u8],
    mut on_header: impl FnMut(&'a str, Range<usize>),
) -> Result<BodyLayout, String> {
    let mut cursor = BodyCursor { body, pos: 0 };
    let offset = cursor.u64("offset")?;
    let timestamp_ms = cursor.i64("timestamp")?;
    let key_len = cursor.u32("key length")?;
    let key = if key_len == NULL_KEY_LEN {
        None
    } else {
        Some(cursor.take(key_len as usize, "key")?)
    };
    let header_count = cursor.u32("header count")?;
    for _ in 0..header_count {
        let name_len = cursor.u16("header name length")?;
        let name_range = cursor.take(usize::from(name_len), "header name")?;
        let name = std::str::from_utf8(&body[name_range])
            .map_err(|e| format!("header name is not UTF-8: {e}"))?;
        let value_len = cursor.u32("header value length")?;
        let value = cursor.take(value_len as usize, "header value")?;
        on_header(name, value);
    }
    Ok(BodyLayout {
        offset,
        timestamp_ms,
        key,
        payload_start: cursor.pos,
    })
}

/// Offset stored in a body that has already passed the frame checks (so has at least
/// [`MIN_BODY_BYTES`] bytes).
fn body_offset(body: &[u8]) -> u64 {
    u64::from_le_bytes(
        body[..8]
            .try_into()
            .expect("frame checks guarantee MIN_BODY_BYTES"),
    )
}

/// Decodes a checked body into a [`Record`]; key, header values and payload share `body`'s
/// memory.
pub(crate) fn decode_body(body: &Bytes) -> Result<Record, String> {
    let mut headers = Vec::new();
    let layout = walk_body(body, |name, value| {
        headers.push((name.to_owned(), body.slice(value)));
    })?;
    Ok(Record {
        offset: layout.offset,
        timestamp_ms: layout.timestamp_ms,
        key: layout.key.map(|range| body.slice(range)),
        headers,
        payload: body.slice(layout.payload_start..),
    })
}

/// Why a frame could not be read.
pub(crate) enum FrameError {
    /// The file could not be read.
    Io(io::Error),
    /// The bytes at `pos` are not a valid frame: a torn tail, or corruption.
    Bad { pos: u64, reason: String },
}

/// Reads checked frames from `pos` up to `end` of one file, a chunk at a time. Bodies are
/// slices of the chunk, so records decoded from them keep at most one chunk alive.
pub(crate) struct FrameReader<'a> {
    file: &'a File,
    /// File position of `buf[0]`: the start of the next frame.
    pos: u64,
    /// Bytes at and beyond `end` are never read.
    end: u64,
    buf: Bytes,
    chunk_bytes: usize,
}

impl<'a> FrameReader<'a> {
    pub(crate) fn new(file: &'a File, pos: u64, end: u64, chunk_bytes: usize) -> Self {
        FrameReader {
            file,
            pos,
            end,
            buf: Bytes::new(),
            chunk_bytes: chunk_bytes.max(64),
        }
    }

    /// File position of the next frame.
    pub(crate) fn position(&self) -> u64 {
        self.pos
    }

    /// The next frame's body, `None` at exactly `end`, or why the bytes at `position()` are not
    /// a frame (too short for a header, a length below the minimum or past `end`, a checksum
    /// mismatch). On error the reader does not move.
    pub(crate) fn next_body(&mut self) -> Result<Option<Bytes>, FrameError> {
        let remaining = self.end - self.pos;
        if remaining == 0 {
            return Ok(None);
        }
        let pos = self.pos;
        let bad = |reason: String| FrameError::Bad { pos, reason };
        if remaining < FRAME_HEADER_BYTES {
            return Err(bad(format!(
                "incomplete frame header: {remaining} bytes left"
            )));
        }
        self.fill(FRAME_HEADER_BYTES)?;
        let body_len = u64::from(u32::from_le_bytes(
            self.buf[0..4].try_into().expect("filled 8 bytes"),
        ));
        let crc = u32::from_le_bytes(self.buf[4..8].try_into().expect("filled 8 bytes"));
        if body_len < MIN_BODY_BYTES {
            return Err(bad(format!(
                "frame body length {body_len} is below the minimum of {MIN_BODY_BYTES}"
            )));
        }
        let frame_len = FRAME_HEADER_BYTES + body_len;
        if frame_len > remaining {
            return Err(bad(format!(
                "frame of {frame_len} bytes runs past the end ({remaining} bytes left)"
            )));
        }
        self.fill(frame_len)?;
        // frame_len <= remaining, and fill() has just held that many bytes in memory.
        let frame_len_usize = frame_len as usize;
        let body = self.buf.slice(FRAME_HEADER_BYTES as usize..frame_len_usize);
        let actual = crc32fast::hash(&body);
        if actual != crc {
            return Err(bad(format!(
                "checksum mismatch: stored {crc:#010x}, computed {actual:#010x}"
            )));
        }
        self.buf = self.buf.slice(frame_len_usize..);
        self.pos += frame_len;
        Ok(Some(body))
    }

    /// Makes `buf` hold at least `need` bytes from `pos` (the caller checked `need <= end - pos`).
    fn fill(&mut self, need: u64) -> Result<(), FrameError> {
        if self.buf.len() as u64 >= need {
            return Ok(());
        }
        let want = need.max(self.chunk_bytes as u64).min(self.end - self.pos);
        let want = usize::try_from(want).map_err(|_| FrameError::Bad {
            pos: self.pos,
            reason: format!("frame of {want} bytes does not fit in memory"),
        })?;
        let mut chunk = vec![0; want];
        self.file
            .read_exact_at(&mut chunk, self.pos)
            .map_err(FrameError::Io)?;
        self.buf = Bytes::from(chunk);
        Ok(())
    }
}

/// Offset → byte position of some frames of a segment, one at least every
/// [`INDEX_INTERVAL_BYTES`], always including the first frame.
#[derive(Default)]
struct SparseIndex {
    /// (offset, position), both strictly increasing.
    entries: Vec<(u64, u64)>,
}

impl SparseIndex {
    fn note(&mut self, offset: u64, pos: u64) {
        let due = match self.entries.last() {
            None => true,
            Some(&(_, last_pos)) => pos - last_pos >= INDEX_INTERVAL_BYTES,
        };
        if due {
            self.entries.push((offset, pos));
        }
    }

    /// Position of the last indexed frame at or before `offset` (0 if none).
    fn position_for(&self, offset: u64) -> u64 {
        let after = self.entries.partition_point(|&(o, _)| o <= offset);
        after.checked_sub(1).map_or(0, |i| self.entries[i].1)
    }
}

/// One segment file and what the log knows about it in memory.
pub(crate) struct Segment {
    /// Offset of the first record in the file (the one in its name).
    pub(crate) base_offset: u64,
    /// Offset after the last record; equal to `base_offset` when empty.
    pub(crate) next_offset: u64,
    /// Bytes of complete frames; the file is never read at or beyond this, and the next append
    /// writes here.
    pub(crate) bytes: u64,
    /// Largest record timestamp, `i64::MIN` when empty.
    pub(crate) max_timestamp_ms: i64,
    pub(crate) path: PathBuf,
    /// Shared with readers and the syncer, who use positional I/O so no cursor is shared. The
    /// writer (holding the log's writer lock) appends at `bytes`; readers only read below the
    /// `bytes` they saw under that lock; the syncer only fsyncs. Deleting the file while a
    /// reader holds this handle is fine on Unix: the reader finishes on the unlinked inode.
    pub(crate) file: Arc<File>,
    index: SparseIndex,
}

impl Segment {
    /// Creates an empty segment file starting at `base_offset`. Fails if the file exists. The
    /// caller fsyncs the directory.
    pub(crate) fn create(dir: &Path, base_offset: u64) -> Result<Segment, LogError> {
        let path = dir.join(segment_file_name(base_offset));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|source| LogError::io(&path, source))?;
        Ok(Segment {
            base_offset,
            next_offset: base_offset,
            bytes: 0,
            max_timestamp_ms: i64::MIN,
            path,
            file: Arc::new(file),
            index: SparseIndex::default(),
        })
    }

    /// Opens an existing segment and checks every frame: length, checksum, body layout and
    /// consecutive offsets starting at `base_offset`.
    ///
    /// In the last segment (`is_last`), the first frame that fails is a torn tail: the file is
    /// truncated there and fsync'd, with a warning naming the bytes cut. Anywhere else a failed
    /// frame is [`LogError::Corrupt`]. A complete frame with a good checksum whose body exceeds
    /// `record_bytes_max` is [`LogError::Corrupt`] even in the last segment: it was written under
    /// a larger limit, and cutting it would lose acknowledged data.
    pub(crate) fn recover(
        path: PathBuf,
        base_offset: u64,
        record_bytes_max: u32,
        is_last: bool,
    ) -> Result<Segment, LogError> {
        let file = OpenOptions::new()
            .read(true)
            .write(is_last)
            .open(&path)
            .map_err(|source| LogError::io(&path, source))?;
        let file_bytes = file
            .metadata()
            .map_err(|source| LogError::io(&path, source))?
            .len();
        let mut segment = Segment {
            base_offset,
            next_offset: base_offset,
            bytes: 0,
            max_timestamp_ms: i64::MIN,
            path,
            file: Arc::new(file),
            index: SparseIndex::default(),
        };
        let failure = segment.scan(file_bytes, record_bytes_max)?;
        let Some((pos, reason)) = failure else {
            return Ok(segment);
        };
        if !is_last {
            return Err(LogError::Corrupt {
                path: segment.path,
                offset: pos,
                reason,
            });
        }
        segment
            .file
            .set_len(pos)
            .and_then(|()| segment.file.sync_data())
            .map_err(|source| LogError::io(&segment.path, source))?;
        tracing::warn!(
            path = %segment.path.display(),
            cut_bytes = file_bytes - pos,
            kept_bytes = pos,
            next_offset = segment.next_offset,
            %reason,
            "cut torn tail of log segment",
        );
        Ok(segment)
    }

    /// Scans frames from the start, filling in the index and counters. Returns the position and
    /// reason of the first bad frame, if any; errors only for I/O and over-limit records.
    fn scan(
        &mut self,
        file_bytes: u64,
        record_bytes_max: u32,
    ) -> Result<Option<(u64, String)>, LogError> {
        let file = Arc::clone(&self.file);
        let mut reader = FrameReader::new(&file, 0, file_bytes, SCAN_CHUNK_BYTES);
        loop {
            let pos = reader.position();
            let body = match reader.next_body() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(None),
                Err(FrameError::Io(source)) => return Err(LogError::io(&self.path, source)),
                Err(FrameError::Bad { pos, reason }) => return Ok(Some((pos, reason))),
            };
            if body.len() as u64 > u64::from(record_bytes_max) {
                return Err(LogError::Corrupt {
                    path: self.path.clone(),
                    offset: pos,
                    reason: format!(
                        "record of {} bytes exceeds record_bytes_max of {record_bytes_max} \
                         (was the limit lowered?)",
                        body.len()
                    ),
                });
            }
            let layout = match walk_body(&body, |_, _| {}) {
                Ok(layout) => layout,
                Err(reason) => return Ok(Some((pos, format!("malformed record: {reason}")))),
            };
            if layout.offset != self.next_offset {
                return Ok(Some((
                    pos,
                    format!(
                        "record has offset {} where {} was expected",
                        layout.offset, self.next_offset
                    ),
                )));
            }
            self.index.note(layout.offset, pos);
            self.next_offset += 1;
            self.bytes = reader.position();
            self.max_timestamp_ms = self.max_timestamp_ms.max(layout.timestamp_ms);
        }
    }

    /// Records that `batch` (with offsets already assigned from `next_offset`) was written at
    /// `bytes`.
    pub(crate) fn note_appended(&mut self, batch: &EncodedBatch) {
        let base_pos = self.bytes;
        for (start, timestamp_ms) in batch.frame_positions() {
            self.index.note(self.next_offset, base_pos + start);
            self.next_offset += 1;
            self.max_timestamp_ms = self.max_timestamp_ms.max(timestamp_ms);
        }
        self.bytes += batch.buf.len() as u64;
    }

    /// Byte position to start reading at to find `offset`: the last indexed frame at or before
    /// it, or 0 if `offset` precedes the segment.
    pub(crate) fn position_for(&self, offset: u64) -> u64 {
        self.index.position_for(offset)
    }
}

/// The records one [`super::Log::read`] call collects, possibly from several segments.
pub(crate) struct ReadBatch {
    /// Records with smaller offsets are skipped.
    from: u64,
    max_records: usize,
    /// Frame bytes allowed in `records`, except that the first record is always taken.
    max_bytes: usize,
    /// Frame bytes of `records` so far.
    used_bytes: usize,
    pub(crate) records: Vec<Record>,
}

impl ReadBatch {
    pub(crate) fn new(from: u64, max_records: usize, max_bytes: usize) -> Self {
        ReadBatch {
            from,
            max_records,
            max_bytes,
            used_bytes: 0,
            records: Vec::new(),
        }
    }

    /// Reads the frames of one segment file in `pos..end` (complete frames, as seen under the
    /// writer lock), keeping records with offset >= `from` until a limit is reached. Returns
    /// `true` when a limit stopped the read, so later segments need not be read.
    pub(crate) fn read_segment(
        &mut self,
        file: &File,
        path: &Path,
        pos: u64,
        end: u64,
    ) -> Result<bool, LogError> {
        if self.records.len() >= self.max_records {
            return Ok(true);
        }
        let chunk_bytes = self
            .max_bytes
            .saturating_add(INDEX_INTERVAL_BYTES as usize)
            .clamp(16 << 10, SCAN_CHUNK_BYTES);
        let mut reader = FrameReader::new(file, pos, end, chunk_bytes);
        loop {
            let frame_pos = reader.position();
            let body = match reader.next_body() {
                Ok(Some(body)) => body,
                Ok(None) => return Ok(false),
                Err(FrameError::Io(source)) => return Err(LogError::io(path, source)),
                Err(FrameError::Bad { pos, reason }) => {
                    return Err(LogError::Corrupt {
                        path: path.to_owned(),
                        offset: pos,
                        reason,
                    });
                }
            };
            if body_offset(&body) < self.from {
                continue;
            }
            let frame_bytes = FRAME_HEADER_BYTES as usize + body.len();
            if !self.records.is_empty()
                && self.used_bytes.saturating_add(frame_bytes) > self.max_bytes
            {
                return Ok(true);
            }
            let record = decode_body(&body).map_err(|reason| LogError::Corrupt {
                path: path.to_owned(),
                offset: frame_pos,
                reason: format!("malformed record: {reason}"),
            })?;
            self.records.push(record);
            self.used_bytes += frame_bytes;
            if self.records.len() >= self.max_records {
                return Ok(true);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_round_trip() {
        assert_eq!(segment_file_name(42), "00000000000000000042.seg");
        assert_eq!(
            parse_segment_file_name("00000000000000000042.seg"),
            Some(42)
        );
        assert_eq!(parse_segment_file_name("42.seg"), None);
        assert_eq!(parse_segment_file_name("0000000000000000004x.seg"), None);
        assert_eq!(parse_segment_file_name("LOCK"), None);
    }

    #[test]
    fn encoded_frame_decodes_with_combined_checksum() {
        let record = NewRecord {
            timestamp_ms: -5,
            key: Some(Bytes::from_static(b"k")),
            headers: vec![("h".to_owned(), Bytes::from_static(b"v"))],
            payload: Bytes::from_static(b"payload"),
        };
        let mut batch = EncodedBatch::encode(std::slice::from_ref(&record));
        batch.assign_offsets(7);
        let body_len = u32::from_le_bytes(batch.buf[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(batch.buf[4..8].try_into().expect("4 bytes"));
        let body = Bytes::copy_from_slice(&batch.buf[8..]);
        assert_eq!(body.len(), body_len);
        assert_eq!(body_len as u64, encoded_body_bytes(&record).0);
        assert_eq!(crc, crc32fast::hash(&body));
        let decoded = decode_body(&body).expect("valid body");
        assert_eq!(decoded.offset, 7);
        assert_eq!(decoded.timestamp_ms, -5);
        assert_eq!(decoded.key, record.key);
        assert_eq!(decoded.headers, record.headers);
        assert_eq!(decoded.payload, record.payload);
    }

    #[test]
    fn malformed_body_is_rejected() {
        let mut body = Vec::new();
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0i64.to_le_bytes());
        body.extend_from_slice(&100u32.to_le_bytes()); // key longer than the body
        body.extend_from_slice(&0u32.to_le_bytes());
        let err = decode_body(&Bytes::from(body)).unwrap_err();
        assert!(err.contains("key of 100 bytes"), "{err}");
    }

    #[test]
    fn sparse_index_finds_preceding_entry() {
        let mut index = SparseIndex::default();
        index.note(10, 0);
        index.note(11, 100); // too close, skipped
        index.note(50, 5000);
        assert_eq!(index.position_for(10), 0);
        assert_eq!(index.position_for(49), 0);
        assert_eq!(index.position_for(50), 5000);
        assert_eq!(index.position_for(99), 5000);
    }
}
