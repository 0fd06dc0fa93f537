//! Epoch snapshots and checkpoint manifests.
//!
//! A dataflow's checkpoint is one *state file* (`epoch-<n>.state`: every input's position,
//! every operator's state, the root's state, in tree order, written with [`SnapshotWriter`])
//! and one *manifest* (`MANIFEST`, JSON) naming the last complete epoch, its state file, its
//! size and checksum. The state file is written and synced first; the manifest is replaced
//! atomically (temp file, fsync, rename, directory fsync), so a crash at any moment leaves
//! the previous manifest or the new one, never a torn one. State files older than the
//! manifest's are deleted after the rename.

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use serde::{Deserialize, Serialize};

use crate::types::{SqlState, WeirError, WeirResult};

/// Appends values to a state blob; [`SnapshotReader`] reads them back in the same order.
#[derive(Default)]
pub struct SnapshotWriter {
    buf: Vec<u8>,
}

impl SnapshotWriter {
    pub fn new() -> Self {
        SnapshotWriter::default()
    }

    pub fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.u64(b.len() as u64);
        self.buf.extend_from_slice(b);
    }

    /// A record batch as an Arrow IPC stream (with its schema).
    pub fn batch(&mut self, batch: &RecordBatch) -> WeirResult<()> {
        let mut ipc = Vec::with_capacity(batch.get_array_memory_size() + 256);
        let internal = |e: arrow::error::ArrowError| WeirError::internal(format!("snapshot: {e}"));
        let mut writer = StreamWriter::try_new(&mut ipc, &batch.schema()).map_err(internal)?;
        writer.write(batch).map_err(internal)?;
        writer.finish().map_err(internal)?;
        drop(writer);
        self.bytes(&ipc);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// Reads what a [`SnapshotWriter`] wrote. The bytes come from disk: every failure is a
/// data-corruption error, never a panic.
pub struct SnapshotReader<'a> {
    buf: &'a [u8],
    pos: usize,
}

fn corrupt(what: impl std::fmt::Display) -> WeirError {
    WeirError::new(
        SqlState::DATA_CORRUPTED,
        format!("checkpoint state is unreadable: {what}"),
    )
}

impl<'a> SnapshotReader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        SnapshotReader { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> WeirResult<&'a [u8]> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| corrupt("truncated"))?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub fn u64(&mut self) -> WeirResult<u64> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(
            b.try_into().map_err(|_| corrupt("u64"))?,
        ))
    }

    pub fn i64(&mut self) -> WeirResult<i64> {
        let b = self.take(8)?;
        Ok(i64::from_le_bytes(
            b.try_into().map_err(|_| corrupt("i64"))?,
        ))
    }

    pub fn bytes(&mut self) -> WeirResult<&'a [u8]> {
        let n = usize::try_from(self.u64()?).map_err(|_| corrupt("length"))?;
        self.take(n)
    }

    pub fn batch(&mut self) -> WeirResult<RecordBatch> {
        let bytes = self.bytes()?;
        let mut reader = StreamReader::try_new(Cursor::new(bytes), None).map_err(corrupt)?;
        reader
            .next()
            .ok_or_else(|| corrupt("missing batch"))?
            .map_err(corrupt)
    }

    pub fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }
}

/// The last complete checkpoint of one dataflow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub epoch: u64,
    /// Milliseconds since the Unix epoch when the checkpoint began.
    pub taken_at_ms: i64,
    /// How long taking it took: snapshot, write, sync, sink pre-commit.
    pub duration_ms: u64,
    pub bytes: u64,
    /// What the state belongs to (the view's definition): a checkpoint of another
    /// definition is never restored.
    pub fingerprint: String,
    pub state_file: String,
    pub crc32: u32,
}

const MANIFEST: &str = "MANIFEST";

/// One dataflow's checkpoint directory.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    dir: PathBuf,
}

fn io(what: &str, path: &Path, e: std::io::Error) -> WeirError {
    WeirError::new(
        SqlState::IO_ERROR,
        format!("checkpoint: {what} {}: {e}", path.display()),
    )
    .with_hint("check that the data directory is writable and has free space")
}

fn sync_dir(dir: &Path) -> WeirResult<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing", dir, e))
}

impl CheckpointStore {
    pub fn new(dir: impl Into<PathBuf>) -> CheckpointStore {
        CheckpointStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The last complete checkpoint and its state, if any. A manifest whose state file is
    /// missing or fails its checksum is an error (the data directory was damaged).
    pub fn latest(&self) -> WeirResult<Option<(Manifest, Vec<u8>)>> {
        let path = self.dir.join(MANIFEST);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path, e)),
        };
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| corrupt(format!("{}: {e}", path.display())))?;
        let state_path = self.dir.join(&manifest.state_file);
        let state = fs::read(&state_path).map_err(|e| io("reading", &state_path, e))?;
        if crc32fast::hash(&state) != manifest.crc32 {
            return Err(corrupt(format!(
                "{} fails its checksum",
                state_path.display()
            )));
        }
        Ok(Some((manifest, state)))
    }

    /// Writes epoch `manifest.epoch`'s state and makes it the latest checkpoint; fills in the
    /// manifest's file name, size and checksum. Older state files are deleted afterwards.
    /// `duration_ms` is measured from `started` to the state file being durable.
    pub fn commit(
        &self,
        mut manifest: Manifest,
        state: &[u8],
        started: std::time::Instant,
    ) -> WeirResult<Manifest> {
        fs::create_dir_all(&self.dir).map_err(|e| io("creating", &self.dir, e))?;
        manifest.state_file = format!("epoch-{:012}.state", manifest.epoch);
        manifest.bytes = state.len() as u64;
        manifest.crc32 = crc32fast::hash(state);
        let state_path = self.dir.join(&manifest.state_file);
        write_synced(&state_path, state)?;
        manifest.duration_ms = started.elapsed().as_millis() as u64;
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| WeirError::internal(format!("manifest: {e}")))?;
        let tmp = self.dir.join("MANIFEST.tmp");
        write_synced(&tmp, &json)?;
        let path = self.dir.join(MANIFEST);
        fs::rename(&tmp, &path).map_err(|e| io("renaming", &path, e))?;
        sync_dir(&self.dir)?;
        self.collect_garbage(&manifest.state_file);
        Ok(manifest)
    }

    /// Deletes state files other than `keep` (best effort: a leftover file is only space).
    fn collect_garbage(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".state") && name != keep {
                let _ = fs::remove_file(entry.path());
            }
        }
    }

    /// Forgets every checkpoint (the dataflow's definition changed or it was dropped).
    pub fn clear(&self) -> WeirResult<()> {
        match fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", &self.dir, e)),
        }
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> WeirResult<()> {
    let mut f = fs::File::create(path).map_err(|e| io("creating", path, e))?;
    f.write_all(bytes).map_err(|e| io("writing", path, e))?;
    f.sync_all().map_err(|e| io("syncing", path, e))
}
