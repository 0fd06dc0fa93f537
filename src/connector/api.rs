//! The [`Source`] contract between connectors and the streaming runtime.

use async_trait::async_trait;

use crate::types::{ChangeBatch, WeirResult};

/// A message that did not decode: it goes to the dead-letter table, the source goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage {
    pub partition: u32,
    pub offset: u64,
    pub reason: String,
    /// The first bytes of the payload, as text (lossy), at most 256 bytes.
    pub payload_prefix: String,
}

/// What one [`Source::poll`] read from one partition.
#[derive(Debug)]
pub struct SourceChunk {
    pub partition: u32,
    /// The decoded rows, in offset order (weights only for updating sources: tables).
    pub changes: ChangeBatch,
    /// The offset of each row's message (a table: its log record).
    pub offsets: Vec<u64>,
    /// Messages of this chunk that did not decode.
    pub bad: Vec<BadMessage>,
}

/// A stream of decoded rows with positions.
///
/// Contract:
/// - `poll` never blocks on the network or waits for new data: it returns what is durable now,
///   in per-partition offset order, or `None` once it has read everything published so far.
///   It may block briefly on local disk; the runtime calls it from a blocking-capable task.
/// - Every message read is accounted for exactly once: as a row of `changes` or as a
///   [`BadMessage`]. A retention gap is skipped (reading resumes at the oldest retained offset).
/// - `positions()[p]` is the next offset to read in partition `p`; `published()[p]` the offset
///   after the newest durable message. The runtime is caught up with a point in time when every
///   position has reached what `published()` said then (`FLUSH` is built on this).
/// - `wait` returns when something new may be readable or at the deadline; cancel-safe.
/// - Sources know nothing of barriers or watermarks: the runtime derives watermarks from the
///   rows' event times, and checkpoints store `positions()`; recovery calls `seek`; after each
///   durable checkpoint the runtime calls `committed` (DESIGN.md principle 5: "then sources
///   acknowledge upstream").
#[async_trait]
pub trait Source: Send + Sync {
    /// The next rows, at most about `max_messages` messages' worth.
    fn poll(&mut self, max_messages: usize) -> WeirResult<Option<SourceChunk>>;
    fn positions(&self) -> Vec<u64>;
    fn published(&self) -> Vec<u64>;
    async fn wait(&self, deadline: tokio::time::Instant);
    /// Whether rows are only ever inserted (topics) rather than also retracted (tables).
    fn append_only(&self) -> bool;
    /// Resumes at `positions` (what `positions()` said at a checkpoint). A position older than
    /// the oldest retained message resumes at the oldest (the gap is retention's, and logged).
    fn seek(&mut self, positions: &[u64]) -> WeirResult<()>;

    /// Runs once a checkpoint that stored `positions` is durable (and, through `seek`, for
    /// the one recovery restored): what is before them may be released upstream (a broker's
    /// acknowledgements).
    fn committed(&mut self, _positions: &[u64]) {}

    /// Whether the source asks for a checkpoint before the interval is up (its upstream stops
    /// delivering until held messages are acknowledged); the runtime takes one next round.
    fn checkpoint_wanted(&self) -> bool {
        false
    }
}

/// Where a materialized view's output goes outside Weir (`CREATE SINK`): files, topics,
/// brokers. A sink runs at the root of its own dataflow and takes part in its checkpoints.
///
/// Contract (two-phase commit, driven by the dataflow's checkpoints):
/// - `write` receives the view's changes in order. Weights are +1 (insert) or −1 (delete);
///   `None` means all inserts. A sink that cannot represent deletes refuses them with an error
///   (the sink then stops and shows the error); the engine refuses such sinks at `CREATE` time
///   when it can tell. `write` never blocks on the network: it buffers.
/// - `tick` runs between rounds of the dataflow (about every 100 ms when idle): time-based
///   work such as closing a file that has been open for `rollover`.
/// - `precommit(epoch)` ends epoch `epoch`: everything written so far is made durable but not
///   visible (staged files, buffered messages), and the sink returns the bytes it needs to
///   finish or redo that epoch; they go into the checkpoint.
/// - `commit(epoch)` runs once the checkpoint of `epoch` is durable: the epoch's output
///   becomes visible. It must be idempotent: after a crash it runs again with the restored
///   state.
/// - `restore(epoch, state)` runs once before anything else: `state` is what `precommit`
///   returned for the last durable checkpoint `epoch` (its `commit` may not have run), or
///   `None` on a fresh start. The sink discards output staged after that checkpoint.
#[async_trait]
pub trait Sink: Send {
    /// One line for `EXPLAIN` and `SHOW SINKS`: the connector and its target.
    fn describe(&self) -> String;

    fn write(&mut self, changes: &ChangeBatch) -> WeirResult<()>;

    async fn tick(&mut self) -> WeirResult<()> {
        Ok(())
    }

    async fn precommit(&mut self, epoch: u64) -> WeirResult<Vec<u8>>;

    async fn commit(&mut self, epoch: u64) -> WeirResult<()>;

    async fn restore(&mut self, epoch: u64, state: Option<&[u8]>) -> WeirResult<()>;
}

/// A topic or broker sink's messages for `changes`: one encoded row each (JSON or CSV, the
/// source formats). A deletion is refused: such sinks only append (0A000, saying how to get
/// an append-only view).
pub fn encode_appends(
    changes: &ChangeBatch,
    format: crate::format::decode::SourceFormat,
    sink: &str,
) -> WeirResult<Vec<Vec<u8>>> {
    if changes
        .weights
        .as_ref()
        .is_some_and(|w| w.values().iter().any(|&x| x != 1))
    {
        return Err(crate::types::WeirError::unsupported(
            format!("a {sink} sink received a retraction: its view is not append-only"),
            "sink a view defined WITH EMIT ON WINDOW CLOSE, or one without aggregates",
        ));
    }
    match format {
        crate::format::decode::SourceFormat::Json => {
            crate::format::decode::encode_json(&changes.rows)
        }
        crate::format::decode::SourceFormat::Csv => {
            crate::format::decode::encode_csv(&changes.rows)
        }
    }
}
