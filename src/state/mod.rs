//! Keyed state that operators and tables keep between changes.
//!
//! Today: [`ZSetState`], the consolidated contents of a table (a multiset of
//! rows kept as Arrow batches) with an optional primary-key index. Epoch
//! snapshots and checkpoint manifests join this module with the streaming
//! runtime. It never does I/O; callers make changes durable first.

mod zset;

pub use zset::ZSetState;
