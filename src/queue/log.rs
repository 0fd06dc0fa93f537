//! [`Log`]: a durable, segmented, append-only log of records in one directory, with group
//! commit, torn-tail recovery, reads by offset and retention by whole segments.
//!
//! This file owns the segment list, offset assignment, rolling, fsync policy and the
//! directory lock. It never interprets payloads, never decides retention policy (callers pass
//! an offset to [`Log::truncate_before`]), never blocks appenders on an fsync, and never holds
//! a lock while waiting on anything but disk I/O for its own operation.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::segment::{self, EncodedBatch, Segment};

/// Name of the file whose `flock` keeps a second [`Log`] (in this or another process) from
/// opening the same directory.
const LOCK_FILE_NAME: &str = "LOCK";

/// What can go wrong in the log. The engine maps these to its own errors.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// A file or directory operation failed. Also returned by every append and sync after an
    /// earlier write or fsync failed (the log is then unusable until reopened, because after a
    /// failed fsync the kernel may have dropped dirty pages it will never write).
    #[error("log i/o error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A segment that recovery must not cut (any but the last) holds a bad frame, segments do not
    /// line up, or a read met bytes that no longer check out. `offset` is the byte position in
    /// the file at `path`, not a record offset.
    #[error("log segment {} is corrupt at byte {offset}: {reason}", path.display())]
    Corrupt {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    /// A record's encoded body (see `segment.rs`) is larger than `record_bytes_max`. Also
    /// returned, with `max` = 65535, for a header name longer than the format's `u16` length.
    /// Nothing of the batch was appended.
    #[error("record of {bytes} bytes exceeds the limit of {max} bytes")]
    RecordTooLarge { bytes: u64, max: u32 },
}

impl LogError {
    pub(crate) fn io(path: &Path, source: io::Error) -> LogError {
        LogError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// Limits of one log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// A new segment is started when appending a batch would take the active segment past this
    /// size. A batch is never split across segments, so one segment can exceed the limit by up to
    /// one batch (or hold a single batch larger than the limit).
    pub segment_bytes_max: u64,
    /// Largest encoded record body accepted by [`Log::append`]. Do not lower it below the size
    /// of records already stored: opening a segment holding a larger record is
    /// [`LogError::Corrupt`] rather than a silent cut.
    pub record_bytes_max: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 64 << 20,
            record_bytes_max: 16 << 20,
        }
    }
}

/// A record to append; the log assigns its offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewRecord {
    /// Event or publish time, stored as given.
    pub timestamp_ms: i64,
    /// `None` is a NULL key, distinct from an empty key.
    pub key: Option<Bytes>,
    /// Name/value pairs in order; names repeat freely. Names are at most 65535 bytes.
    pub headers: Vec<(String, Bytes)>,
    pub payload: Bytes,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub timestamp_ms: i64,
    pub key: Option<Bytes>,
    pub headers: Vec<(String, Bytes)>,
    pub payload: Bytes,
}

/// What a retention policy needs to know about one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Offset of the segment's first record.
    pub base_offset: u64,
    /// Offset after its last record (`== base_offset` when empty).
    pub next_offset: u64,
    /// Size of its complete frames.
    pub bytes: u64,
    /// Largest record timestamp in it; `i64::MIN` when empty (only the active segment can be).
    pub max_timestamp_ms: i64,
}

/// The durable log. `Send + Sync`; share it as `Arc<Log>`. Every method blocks on disk I/O, so
/// async callers use `spawn_blocking`.
///
/// Offsets are dense: the record appended after offset `n` gets `n + 1`, across segments and
/// restarts. Records that were appended but not yet synced may be lost in a crash (a prefix of
/// them may survive); records covered by a returned [`Log::sync_to`] never are.
pub struct Log {
    dir: PathBuf,
    config: LogConfig,
    /// Held by appenders (write + roll), `truncate_before`, and briefly by readers and the
    /// syncer to snapshot the segment list. Never held during an fsync of the active segment
    /// (only during the fsync of a segment being rolled away, which is rare).
    state: Mutex<State>,
    /// Serialises `sync_to` callers so that one fsync covers all who queued behind it: a waiter
    /// re-checks `durable_end` after acquiring it. Taken before `state`, never after.
    sync_lock: Mutex<()>,
    /// Every record with offset below this is on disk. Only grows (`fetch_max`).
    durable_end: AtomicU64,
    /// fsyncs made by `sync_to`; lets tests check that concurrent callers share one.
    sync_count: AtomicU64,
    /// Holds an exclusive `flock` on `dir/LOCK` for the life of the log; released on drop.
    _lock_file: File,
}

struct State {
    /// Oldest first, contiguous offsets; the last one is the active segment, which appends go
    /// to. Never empty.
    segments: Vec<Segment>,
    /// Set when a write could not be undone or an fsync failed; then appends and syncs refuse
    /// to run (reads still work).
    failure: Option<String>,
}

impl State {
    fn active(&self) -> &Segment {
        self.segments
            .last()
            .expect("a log always has an active segment")
    }

    fn active_mut(&mut self) -> &mut Segment {
        self.segments
            .last_mut()
            .expect("a log always has an active segment")
    }

    fn check_usable(&self) -> Result<(), LogError> {
        match &self.failure {
            None => Ok(()),
            Some(reason) => Err(LogError::io(
                &self.active().path,
                io::Error::other(format!(
                    "the log is unusable after an earlier failure ({reason}); reopen it"
                )),
            )),
        }
    }
}

/// A segment as a reader saw it under the writer lock: the frames in `start_pos..end_pos` are
/// complete and will not change while the reader reads them without the lock.
struct ReadView {
    file: Arc<File>,
    path: PathBuf,
    start_pos: u64,
    end_pos: u64,
}

impl Log {
    /// Opens or creates the log in `dir` (creating the directory).
    ///
    /// Every segment is scanned and checked (length, checksum, layout, consecutive offsets, and
    /// that each segment starts where the previous one ends). In the last segment the first bad
    /// frame marks a torn tail: the file is cut there and fsync'd, with a `warn` naming the
    /// bytes cut, and [`Log::next_offset`] continues from the last good record. A bad frame in
    /// any other segment is [`LogError::Corrupt`]. Fails with [`LogError::Io`] if another `Log`
    /// has the directory open.
    pub fn open(dir: &Path, config: LogConfig) -> Result<Log, LogError> {
        fs::create_dir_all(dir).map_err(|source| LogError::io(dir, source))?;
        let lock_path = dir.join(LOCK_FILE_NAME);
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|source| LogError::io(&lock_path, source))?;
        lock_file.try_lock().map_err(|e| {
            let source = match e {
                fs::TryLockError::WouldBlock => io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the log directory is already open in another log",
                ),
                fs::TryLockError::Error(source) => source,
            };
            LogError::io(&lock_path, source)
        })?;

        let mut bases = Vec::new();
        for entry in fs::read_dir(dir).map_err(|source| LogError::io(dir, source))? {
            let entry = entry.map_err(|source| LogError::io(dir, source))?;
            let name = entry.file_name();
            match name.to_str().and_then(segment::parse_segment_file_name) {
                Some(base) => bases.push(base),
                None if name == LOCK_FILE_NAME => {}
                None => tracing::warn!(
                    path = %entry.path().display(),
                    "ignoring unexpected file in log directory"
                ),
            }
        }
        bases.sort_unstable();

        let mut segments: Vec<Segment> = Vec::with_capacity(bases.len().max(1));
        for (i, &base) in bases.iter().enumerate() {
            let path = dir.join(segment::segment_file_name(base));
            if let Some(previous) = segments.last()
                && previous.next_offset != base
            {
                return Err(LogError::Corrupt {
                    path,
                    offset: 0,
                    reason: format!(
                        "segment starts at offset {base} but the previous segment ends at {}",
                        previous.next_offset
                    ),
                });
            }
            let is_last = i + 1 == bases.len();
            segments.push(Segment::recover(
                path,
                base,
                config.record_bytes_max,
                is_last,
            )?);
        }
        if segments.is_empty() {
            segments.push(Segment::create(dir, 0)?);
        }
        // The previous process may have died before its last appends reached the disk, and a
        // fresh segment's directory entry may not be durable yet: make both so, so that
        // everything we now consider present is durable.
        let active = segments.last().expect("pushed above");
        active
            .file
            .sync_data()
            .map_err(|source| LogError::io(&active.path, source))?;
        sync_dir(dir)?;
        let next_offset = active.next_offset;

        Ok(Log {
            dir: dir.to_owned(),
            config,
            state: Mutex::new(State {
                segments,
                failure: None,
            }),
            sync_lock: Mutex::new(()),
            durable_end: AtomicU64::new(next_offset),
            sync_count: AtomicU64::new(0),
            _lock_file: lock_file,
        })
    }

    /// Appends `records` with consecutive offsets and writes them to the active segment, without
    /// fsync; returns the offsets assigned (empty for no records). The batch is all or nothing
    /// as seen by this process: if any record is too large ([`LogError::RecordTooLarge`]) or the
    /// write fails, no offset is consumed. Before writing, rolls to a new segment if the batch
    /// would take a non-empty active segment past `segment_bytes_max`: the old segment is
    /// fsync'd first, and the directory after the new file is created.
    pub fn append(&self, records: &[NewRecord]) -> Result<Range<u64>, LogError> {
        for record in records {
            let (body_bytes, longest_name) = segment::encoded_body_bytes(record);
            if body_bytes > u64::from(self.config.record_bytes_max) {
                return Err(LogError::RecordTooLarge {
                    bytes: body_bytes,
                    max: self.config.record_bytes_max,
                });
            }
            if longest_name > usize::from(u16::MAX) {
                return Err(LogError::RecordTooLarge {
                    bytes: longest_name as u64,
                    max: u32::from(u16::MAX),
                });
            }
        }
        // Copy and checksum outside the lock; only the offsets are patched in under it.
        let mut batch = EncodedBatch::encode(records);

        let mut state = self.lock_state();
        state.check_usable()?;
        let first = state.active().next_offset;
        if batch.len() == 0 {
            return Ok(first..first);
        }
        let active = state.active();
        if active.bytes > 0
            && active.bytes.saturating_add(batch.buf.len() as u64) > self.config.segment_bytes_max
        {
            self.roll(&mut state)?;
        }
        batch.assign_offsets(first);

        let active = state.active();
        if let Err(source) = active.file.write_all_at(&batch.buf, active.bytes) {
            // Cut whatever part was written, so that a later, shorter batch cannot leave stale
            // but well-formed frames of this one behind it.
            let path = active.path.clone();
            if let Err(undo) = active.file.set_len(active.bytes) {
                state.failure = Some(format!(
                    "write to {} failed ({source}) and could not be undone ({undo})",
                    path.display()
                ));
            }
            return Err(LogError::io(&path, source));
        }
        state.active_mut().note_appended(&batch);
        Ok(first..first + batch.len() as u64)
    }

    /// Starts a new active segment at the current next offset. The old segment is fsync'd
    /// first (so `sync_to` never needs to look at it again), and the directory after the new
    /// file is created.
    fn roll(&self, state: &mut MutexGuard<'_, State>) -> Result<(), LogError> {
        let old = state.active();
        let (old_path, next_offset) = (old.path.clone(), old.next_offset);
        if let Err(source) = old.file.sync_data() {
            state.failure = Some(format!("fsync of {} failed: {source}", old_path.display()));
            return Err(LogError::io(&old_path, source));
        }
        self.durable_end.fetch_max(next_offset, Ordering::AcqRel);
        let new = Segment::create(&self.dir, next_offset)?;
        if let Err(error) = sync_dir(&self.dir) {
            // Writing on into a file whose directory entry might vanish in a crash would lose
            // acknowledged records; stop instead.
            state.failure = Some(format!("fsync of {} failed", self.dir.display()));
            return Err(error);
        }
        state.segments.push(new);
        Ok(())
    }

    /// Group commit: returns once every record with offset < `end` is durable. `end` beyond
    /// [`Log::next_offset`] is treated as `next_offset`. Returns at once if an earlier fsync
    /// already covered `end`; callers that arrive during an fsync wait for it and then share
    /// the next one. Appenders are not blocked by the fsync.
    pub fn sync_to(&self, end: u64) -> Result<(), LogError> {
        if self.durable_end.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        let _sync = self
            .sync_lock
            .lock()
            .expect("sync lock poisoned: a syncer panicked");
        if self.durable_end.load(Ordering::Acquire) >= end {
            return Ok(());
        }
        // Everything below `target` is in the active segment or in segments rolled away, which
        // were fsync'd when they were rolled.
        let (file, path, target) = {
            let state = self.lock_state();
            state.check_usable()?;
            let active = state.active();
            (
                Arc::clone(&active.file),
                active.path.clone(),
                active.next_offset,
            )
        };
        self.sync_count.fetch_add(1, Ordering::Relaxed);
        if let Err(source) = file.sync_data() {
            self.lock_state().failure =
                Some(format!("fsync of {} failed: {source}", path.display()));
            return Err(LogError::io(&path, source));
        }
        self.durable_end.fetch_max(target, Ordering::AcqRel);
        Ok(())
    }

    /// [`Log::append`] then [`Log::sync_to`] its end: once this returns, the records are
    /// acknowledged and survive a crash.
    pub fn append_durable(&self, records: &[NewRecord]) -> Result<Range<u64>, LogError> {
        let range = self.append(records)?;
        if !range.is_empty() {
            self.sync_to(range.end)?;
        }
        Ok(range)
    }

    /// Offset the next appended record will get.
    pub fn next_offset(&self) -> u64 {
        self.lock_state().active().next_offset
    }

    /// Offset of the oldest retained record (or of the next record, if none is retained): 0
    /// until [`Log::truncate_before`] deletes segments.
    pub fn start_offset(&self) -> u64 {
        self.lock_state().segments[0].base_offset
    }

    /// Reads records with offset >= `from` in offset order: at most `max_records`, and stopping
    /// before the frames read would exceed `max_bytes`, except that at least one record is
    /// returned if any exists at or after `from`. Sees every record whose `append` has returned,
    /// synced or not. `from` below [`Log::start_offset`] reads from the start offset (compare
    /// the first offset returned to notice the gap); `from` at or past the end returns nothing.
    /// May span segments. Does not block appenders while reading the files.
    pub fn read(
        &self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>, LogError> {
        if max_records == 0 {
            return Ok(Vec::new());
        }
        let (from, views) = {
            let state = self.lock_state();
            let from = from.max(state.segments[0].base_offset);
            if from >= state.active().next_offset {
                return Ok(Vec::new());
            }
            // The last segment whose base is <= from holds `from` (segments are contiguous).
            let first = state
                .segments
                .partition_point(|s| s.base_offset <= from)
                .saturating_sub(1);
            let mut views = Vec::new();
            let mut records_seen = 0u64;
            for segment in &state.segments[first..] {
                views.push(ReadView {
                    file: Arc::clone(&segment.file),
                    path: segment.path.clone(),
                    start_pos: segment.position_for(from),
                    end_pos: segment.bytes,
                });
                // Segments past those holding `max_records` records will not be reached.
                records_seen += segment
                    .next_offset
                    .saturating_sub(segment.base_offset.max(from));
                if records_seen >= max_records as u64 {
                    break;
                }
            }
            (from, views)
        };
        let mut batch = segment::ReadBatch::new(from, max_records, max_bytes);
        for view in views {
            if batch.read_segment(&view.file, &view.path, view.start_pos, view.end_pos)? {
                break;
            }
        }
        Ok(batch.records)
    }

    /// Deletes the oldest segments whose records all have offsets below `before_offset`, oldest
    /// first, never the active segment; returns how many were deleted and moves
    /// [`Log::start_offset`]. If deleting one fails, the ones before it stay deleted and the error
    /// is returned. Readers holding a deleted segment open finish their read. Blocks appenders
    /// while unlinking.
    pub fn truncate_before(&self, before_offset: u64) -> Result<usize, LogError> {
        let mut state = self.lock_state();
        let mut deleted = 0;
        let mut result = Ok(());
        while state.segments.len() > 1 && state.segments[0].next_offset <= before_offset {
            let path = &state.segments[0].path;
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => {
                    result = Err(LogError::io(path, source));
                    break;
                }
            }
            state.segments.remove(0);
            deleted += 1;
        }
        drop(state);
        if deleted > 0 {
            sync_dir(&self.dir)?;
        }
        result.map(|()| deleted)
    }

    /// The segments, oldest first; the last is the active one.
    pub fn segments(&self) -> Vec<SegmentInfo> {
        self.lock_state()
            .segments
            .iter()
            .map(|s| SegmentInfo {
                base_offset: s.base_offset,
                next_offset: s.next_offset,
                bytes: s.bytes,
                max_timestamp_ms: s.max_timestamp_ms,
            })
            .collect()
    }

    /// Makes every appended record durable (used at shutdown).
    pub fn sync_all(&self) -> Result<(), LogError> {
        self.sync_to(self.next_offset())
    }

    fn lock_state(&self) -> MutexGuard<'_, State> {
        // Nothing in the critical sections panics except on broken invariants, after which the
        // process is not worth keeping alive.
        self.state
            .lock()
            .expect("log state poisoned: a writer panicked")
    }
}

/// fsyncs a directory, making file creations and deletions in it durable.
fn sync_dir(dir: &Path) -> Result<(), LogError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| LogError::io(dir, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Log>();
    }

    /// Callers that append while an fsync is running (here: while the sync lock is held) are
    /// all covered by the next single fsync.
    #[test]
    fn waiting_syncers_share_one_fsync() {
        const CALLERS: u64 = 8;
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(Log::open(dir.path(), LogConfig::default()).expect("open"));
        let held = log.sync_lock.lock().expect("sync lock");
        let handles: Vec<_> = (0..CALLERS)
            .map(|i| {
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let record = NewRecord {
                        timestamp_ms: 0,
                        key: None,
                        headers: Vec::new(),
                        payload: Bytes::from(format!("caller {i}")),
                    };
                    log.append_durable(&[record]).expect("append_durable")
                })
            })
            .collect();
        // Appends do not wait for the sync lock; wait (bounded) until all have happened.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while log.next_offset() < CALLERS {
            assert!(
                std::time::Instant::now() < deadline,
                "appends did not finish"
            );
            std::thread::yield_now();
        }
        assert_eq!(log.sync_count.load(Ordering::Relaxed), 0);
        drop(held);
        let mut ends: Vec<u64> = handles
            .into_iter()
            .map(|h| h.join().expect("caller thread").end)
            .collect();
        ends.sort_unstable();
        assert_eq!(ends, (1..=CALLERS).collect::<Vec<_>>());
        assert_eq!(log.sync_count.load(Ordering::Relaxed), 1);
        assert_eq!(log.durable_end.load(Ordering::Acquire), CALLERS);
    }
}
