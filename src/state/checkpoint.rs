//! Epoch snapshots and checkpoint manifests.
//!
//! A dataflow's checkpoint is a *chain* of state files and one *manifest* (`MANIFEST`, JSON)
//! naming it. Each epoch writes one state file (`epoch-<n>.state`: every input's position,
//! then every operator's entry and the root's, in tree order, written with
//! [`SnapshotWriter`]). An entry is either *full* (the operator's whole state) or *changes*
//! (only what changed since the previous epoch: an incremental checkpoint). The chain starts
//! at the last epoch whose entries were all full and holds every epoch since; recovery reads
//! it oldest first, restoring each entry's last full state and applying the changes after
//! it. The runtime decides when to start a new chain (see `stream::runtime`).
//!
//! The new state file is written and synced first; the manifest is replaced atomically
//! (temp file, fsync, rename, directory fsync), so a crash at any moment leaves the previous
//! manifest or the new one, never a torn one. State files outside the new manifest's chain
//! are deleted after the rename.

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

/// One state file of a checkpoint chain.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StateFile {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The last complete checkpoint of one dataflow.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub epoch: u64,
    /// Milliseconds since the Unix epoch when the checkpoint began.
    pub taken_at_ms: i64,
    /// How long taking it took: snapshot, write, sync, sink pre-commit.
    pub duration_ms: u64,
    /// Bytes written for this epoch (its own state file).
    pub bytes: u64,
    /// What the state belongs to (the view's definition): a checkpoint of another
    /// definition is never restored.
    pub fingerprint: String,
    /// Whether this epoch's file extends the previous epoch's chain (some entries hold only
    /// changes) rather than starting a new one.
    pub incremental: bool,
    /// The state files recovery reads, oldest first, ending with this epoch's.
    pub chain: Vec<StateFile>,
}

impl Manifest {
    /// Bytes recovery reads: the whole chain.
    pub fn chain_bytes(&self) -> u64 {
        self.chain.iter().map(|f| f.bytes).sum()
    }
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

    /// The last complete checkpoint and its chain's state files (oldest first), if any. A
    /// manifest whose state files are missing or fail their checksums is an error (the data
    /// directory was damaged).
    pub fn latest(&self) -> WeirResult<Option<(Manifest, Vec<Vec<u8>>)>> {
        let path = self.dir.join(MANIFEST);
        let text = match fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("reading", &path, e)),
        };
        let manifest: Manifest = match serde_json::from_slice(&text) {
            Ok(m) => m,
            // A manifest of an older layout: the caller rebuilds from the inputs.
            Err(_) if !text.windows(7).any(|w| w == b"\"chain\"") => return Ok(None),
            Err(e) => return Err(corrupt(format!("{}: {e}", path.display()))),
        };
        let mut files = Vec::with_capacity(manifest.chain.len());
        for file in &manifest.chain {
            let state_path = self.dir.join(&file.name);
            let state = fs::read(&state_path).map_err(|e| io("reading", &state_path, e))?;
            if crc32fast::hash(&state) != file.crc32 {
                return Err(corrupt(format!(
                    "{} fails its checksum",
                    state_path.display()
                )));
            }
            files.push(state);
        }
        Ok(Some((manifest, files)))
    }

    /// Writes epoch `manifest.epoch`'s state file and makes it the latest checkpoint: the
    /// chain is `previous`'s chain plus this file when `manifest.incremental`, this file alone
    /// otherwise. Fills in the size and the chain. State files outside the chain are deleted
    /// afterwards. `duration_ms` is measured from `started` to the state file being durable.
    pub fn commit(
        &self,
        mut manifest: Manifest,
        previous: Option<&Manifest>,
        state: &[u8],
        started: std::time::Instant,
    ) -> WeirResult<Manifest> {
        fs::create_dir_all(&self.dir).map_err(|e| io("creating", &self.dir, e))?;
        let file = StateFile {
            name: format!("epoch-{:012}.state", manifest.epoch),
            bytes: state.len() as u64,
            crc32: crc32fast::hash(state),
        };
        let state_path = self.dir.join(&file.name);
        write_synced(&state_path, state)?;
        manifest.bytes = file.bytes;
        manifest.chain = match previous {
            Some(p) if manifest.incremental => p.chain.clone(),
            _ => Vec::new(),
        };
        manifest.chain.push(file);
        manifest.duration_ms = started.elapsed().as_millis() as u64;
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| WeirError::internal(format!("manifest: {e}")))?;
        let tmp = self.dir.join("MANIFEST.tmp");
        write_synced(&tmp, &json)?;
        let path = self.dir.join(MANIFEST);
        fs::rename(&tmp, &path).map_err(|e| io("renaming", &path, e))?;
        sync_dir(&self.dir)?;
        self.collect_garbage(&manifest.chain);
        Ok(manifest)
    }

    /// Deletes state files outside `keep` (best effort: a leftover file is only space).
    fn collect_garbage(&self, keep: &[StateFile]) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.ends_with(".state") && !keep.iter().any(|f| f.name == name) {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(epoch: u64, incremental: bool) -> Manifest {
        Manifest {
            epoch,
            taken_at_ms: 0,
            duration_ms: 0,
            bytes: 0,
            fingerprint: "f".into(),
            incremental,
            chain: Vec::new(),
        }
    }

    fn state_files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".state"))
            .collect();
        names.sort();
        names
    }

    #[test]
    fn chains_grow_with_incremental_epochs_and_a_full_one_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path().join("c"));
        assert!(store.latest().unwrap().is_none());
        let now = std::time::Instant::now();
        let m1 = store
            .commit(manifest(1, false), None, b"full-1", now)
            .unwrap();
        let m2 = store
            .commit(manifest(2, true), Some(&m1), b"changes-2", now)
            .unwrap();
        let m3 = store
            .commit(manifest(3, true), Some(&m2), b"changes-3", now)
            .unwrap();
        assert_eq!(m3.chain.len(), 3);
        assert_eq!(m3.chain_bytes(), 6 + 9 + 9);
        let (latest, files) = store.latest().unwrap().unwrap();
        assert_eq!(latest, m3);
        assert_eq!(
            files,
            vec![
                b"full-1".to_vec(),
                b"changes-2".to_vec(),
                b"changes-3".to_vec()
            ]
        );
        assert_eq!(state_files(store.dir()).len(), 3);

        // A full epoch starts a new chain; the old chain's files are deleted.
        let m4 = store
            .commit(manifest(4, false), Some(&m3), b"full-4", now)
            .unwrap();
        assert_eq!(m4.chain.len(), 1);
        assert_eq!(state_files(store.dir()), vec![m4.chain[0].name.clone()]);
        assert_eq!(store.latest().unwrap().unwrap().1, vec![b"full-4".to_vec()]);
    }

    #[test]
    fn a_damaged_chain_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::new(dir.path());
        let now = std::time::Instant::now();
        let m1 = store
            .commit(manifest(1, false), None, b"full", now)
            .unwrap();
        let m2 = store
            .commit(manifest(2, true), Some(&m1), b"changes", now)
            .unwrap();
        fs::write(dir.path().join(&m2.chain[0].name), b"fulL").unwrap();
        let err = store.latest().unwrap_err();
        assert_eq!(err.sqlstate, SqlState::DATA_CORRUPTED);
        fs::remove_file(dir.path().join(&m2.chain[1].name)).unwrap();
        assert!(store.latest().is_err());
    }
}
