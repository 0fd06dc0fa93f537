//! Keyed state that operators and tables keep between changes, and its checkpoints.
//!
//! [`ZSetState`] is the consolidated contents of a table or view (a multiset of rows kept as
//! Arrow batches) with an optional primary-key index; it never does I/O. `checkpoint.rs`
//! holds the epoch snapshot format ([`SnapshotWriter`] / [`SnapshotReader`]) and the
//! checkpoint directory of a dataflow ([`CheckpointStore`]: state files and the atomically
//! replaced manifest).

mod checkpoint;
mod zset;

pub use checkpoint::{CheckpointStore, Manifest, SnapshotReader, SnapshotWriter, StateFile};
pub use zset::{ZSetState, consolidate};
