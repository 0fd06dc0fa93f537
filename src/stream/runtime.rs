//! [`Dataflow`]: the operator tree of one materialized view and the loop that runs it.
//!
//! Each dataflow runs on a thread of its own (with a single-threaded tokio runtime for its
//! waits), so view maintenance never competes with the pgwire tasks for a worker. The loop:
//! read a bounded chunk from each input, derive the input's watermark and late rows, push the
//! rows up the tree, then the watermark; apply what reaches the root to the view's state;
//! answer `FLUSH` requests whose targets are reached; when no input has anything new, wait on
//! all of them (or a control message).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, BooleanArray, Int64Array, TimestampNanosecondArray};
use arrow::compute::filter_record_batch;
use tokio::sync::{mpsc, oneshot};

use super::source::{LateRow, SourceStats, WatermarkSpec};
use super::{EventTime, NO_WATERMARK, Operator};
use crate::connector::api::{Sink, Source, SourceChunk};
use crate::state::{
    CheckpointStore, Manifest, SnapshotReader, SnapshotWriter, ZSetState, consolidate,
};
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// Messages read from one input before the loop turns to the next (bounds batch size and
/// keeps inputs fair).
const POLL_MESSAGES_MAX: usize = 4096;
/// Longest wait between looks at inputs when nothing woke the loop (a safety net: inputs wake
/// it when data arrives).
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// A node of the tree.
pub type NodeId = usize;

/// Where a node's or input's output goes.
#[derive(Debug, Clone, Copy)]
enum Parent {
    Node(NodeId, usize),
    Root,
    /// Not connected yet (during building).
    None,
}

/// A leaf or an operator, while building.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Input(usize),
    Node(NodeId),
}

struct Node {
    op: Box<dyn Operator>,
    children: Vec<Endpoint>,
    parent: Parent,
}

struct Input {
    name: String,
    source: Box<dyn Source>,
    watermark: Option<WatermarkSpec>,
    /// Drop late rows (the input feeds a window).
    drop_late: bool,
    stats: Option<Arc<SourceStats>>,
    parent: Parent,
    max_event_time: EventTime,
    /// The last watermark sent up the tree.
    sent_watermark: EventTime,
    /// When the input last had a message, and its largest event time then (idle timeouts).
    last_activity: (std::time::Instant, EventTime),
}

/// Builds a [`Dataflow`] bottom-up: inputs first, then operators over them.
#[derive(Default)]
pub struct DataflowBuilder {
    nodes: Vec<Node>,
    inputs: Vec<Input>,
}

impl DataflowBuilder {
    pub fn new() -> Self {
        DataflowBuilder::default()
    }

    /// Adds an input. `watermark` derives event time from column `column`; `drop_late` drops
    /// rows behind it (inputs of windows). `stats` receives counts and dead letters.
    pub fn input(
        &mut self,
        name: impl Into<String>,
        source: Box<dyn Source>,
        watermark: Option<WatermarkSpec>,
        drop_late: bool,
        stats: Option<Arc<SourceStats>>,
    ) -> Endpoint {
        self.inputs.push(Input {
            name: name.into(),
            source,
            watermark,
            drop_late,
            stats,
            parent: Parent::None,
            max_event_time: NO_WATERMARK,
            sent_watermark: NO_WATERMARK,
            last_activity: (std::time::Instant::now(), NO_WATERMARK),
        });
        Endpoint::Input(self.inputs.len() - 1)
    }

    /// Adds an operator reading `children` (its inputs 0, 1, ... in order).
    pub fn operator(&mut self, op: Box<dyn Operator>, children: Vec<Endpoint>) -> Endpoint {
        let id = self.nodes.len();
        for (k, child) in children.iter().enumerate() {
            self.set_parent(*child, Parent::Node(id, k));
        }
        self.nodes.push(Node {
            op,
            children,
            parent: Parent::None,
        });
        Endpoint::Node(id)
    }

    fn set_parent(&mut self, at: Endpoint, parent: Parent) {
        match at {
            Endpoint::Input(i) => self.inputs[i].parent = parent,
            Endpoint::Node(n) => self.nodes[n].parent = parent,
        }
    }

    /// Finishes the tree with `root`'s output going to the view.
    pub fn build(mut self, root: Endpoint) -> Dataflow {
        self.set_parent(root, Parent::Root);
        Dataflow {
            nodes: self.nodes,
            inputs: self.inputs,
            root,
            paused: None,
            checkpointing: None,
            epoch: 0,
            last_checkpoint: None,
            restored: None,
            changed_since_checkpoint: false,
            root_changes: RootChanges::default(),
        }
    }
}

/// A view's operators and inputs, ready to run.
pub struct Dataflow {
    nodes: Vec<Node>,
    inputs: Vec<Input>,
    root: Endpoint,
    /// While set, the dataflow reads nothing and answers every FLUSH at once (a source's
    /// monitor while views read the source for it). Set by the engine; read each round.
    paused: Option<Arc<std::sync::atomic::AtomicBool>>,
    checkpointing: Option<Checkpointing>,
    /// The last checkpointed epoch (0: none yet).
    epoch: u64,
    /// Its manifest, which the next incremental checkpoint extends; `None` before the first
    /// and after a failed one (the next is then full, since the failed one may have taken
    /// operators' change sets).
    last_checkpoint: Option<Manifest>,
    /// The root's part of the checkpoint recovery started from (a sink restores it on the
    /// dataflow's thread), with its epoch.
    restored: Option<(u64, Vec<u8>)>,
    /// Whether anything moved since the last checkpoint (an idle view skips checkpoints).
    changed_since_checkpoint: bool,
    /// The view's changes since the last checkpoint.
    root_changes: RootChanges,
}

/// What a view's rows went through since the last checkpoint, so an incremental checkpoint
/// writes the net changes instead of every row.
#[derive(Default)]
struct RootChanges {
    /// Set by the first checkpoint or restore; until then nothing is kept.
    tracking: bool,
    batches: Vec<ChangeBatch>,
    rows: usize,
    /// More changed rows than the view holds: the next checkpoint writes the rows instead.
    overflow: bool,
}

impl RootChanges {
    fn record(&mut self, batch: &ChangeBatch, view_rows: usize) {
        if !self.tracking || self.overflow {
            return;
        }
        self.rows += batch.num_rows();
        if self.rows > view_rows.max(ROOT_CHANGES_MIN) {
            self.overflow = true;
            self.batches.clear();
        } else {
            self.batches.push(batch.clone());
        }
    }

    fn reset(&mut self) {
        *self = RootChanges {
            tracking: true,
            ..RootChanges::default()
        };
    }
}

/// Changed rows a view may collect between checkpoints whatever its size.
const ROOT_CHANGES_MIN: usize = 65_536;

/// Entries of a state file: an operator's (or the root's) whole state, or its changes since
/// the previous epoch.
const ENTRY_FULL: u64 = 0;
const ENTRY_CHANGES: u64 = 1;

/// A chain of state files grows until it holds this many files, or until its incremental
/// files together are as large as its first (full) one; the next checkpoint is then full.
/// Recovery so reads at most about twice the state's size, and a checkpoint writes what
/// changed rather than everything.
const CHAIN_FILES_MAX: usize = 16;

fn extends_chain(last: &Manifest) -> bool {
    let Some((first, rest)) = last.chain.split_first() else {
        return false;
    };
    last.chain.len() < CHAIN_FILES_MAX && rest.iter().map(|f| f.bytes).sum::<u64>() < first.bytes
}

/// One state file of a chain, read.
struct StateEntries<'a> {
    /// Per input: positions, max event time, sent watermark.
    inputs: Vec<(Vec<u64>, EventTime, EventTime)>,
    /// Per node, then the root: entry kind and bytes.
    entries: Vec<(u64, &'a [u8])>,
}

/// The entries of one node (or the root: the last index) across the chain: the last full one
/// and the changes after it.
fn entry_chain<'a, 'b>(
    files: &'b [StateEntries<'a>],
    index: usize,
) -> Option<(&'a [u8], impl Iterator<Item = &'a [u8]> + 'b)> {
    let start = files
        .iter()
        .rposition(|f| f.entries[index].0 == ENTRY_FULL)?;
    Some((
        files[start].entries[index].1,
        files[start + 1..].iter().map(move |f| f.entries[index].1),
    ))
}

/// Where and how often a dataflow checkpoints, and what it reports about it.
pub struct Checkpointing {
    pub store: CheckpointStore,
    pub interval: Duration,
    /// What the state belongs to: a checkpoint with another fingerprint is not restored.
    pub fingerprint: String,
    pub history: Arc<Mutex<CheckpointHistory>>,
}

/// A dataflow's recent checkpoints, for `weir_checkpoints`.
#[derive(Debug, Default, Clone)]
pub struct CheckpointHistory {
    /// The newest last, at most [`CHECKPOINT_HISTORY`].
    pub recent: std::collections::VecDeque<Manifest>,
    /// The epoch recovery restored on start, if any.
    pub restored_epoch: Option<u64>,
    /// The last checkpoint failure (checkpoints are retried at the next interval).
    pub last_error: Option<String>,
}

/// Checkpoints kept in [`CheckpointHistory::recent`].
pub const CHECKPOINT_HISTORY: usize = 32;

/// Format of a dataflow's state file; bumped when the layout changes (an older checkpoint is
/// then not restored: the dataflow rebuilds from its inputs).
const SNAPSHOT_VERSION: u64 = 2;

/// What a dataflow maintains at its root: a view's rows, or a sink.
pub enum Output {
    View(ViewOutput),
    Sink(Box<dyn Sink>, Arc<Mutex<Progress>>),
}

impl Output {
    fn progress(&self) -> Arc<Mutex<Progress>> {
        match self {
            Output::View(v) => v.progress.clone(),
            Output::Sink(_, p) => p.clone(),
        }
    }
}

/// What a running dataflow reports.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Rows in the view.
    pub rows: u64,
    /// Set when the dataflow stopped on an error.
    pub error: Option<WeirError>,
}

/// The view a dataflow maintains: its state (read by `SELECT`) and its progress.
#[derive(Clone)]
pub struct ViewOutput {
    /// Held only to apply one output batch or to take a snapshot.
    pub state: Arc<Mutex<ZSetState>>,
    pub progress: Arc<Mutex<Progress>>,
}

/// A `FLUSH` waiting for the inputs to reach these positions.
type PendingFlush = (Vec<Vec<u64>>, oneshot::Sender<WeirResult<()>>);

/// Control messages to a running dataflow. Closing the channel stops it.
pub enum Control {
    /// Answer once every input has read all that was published when this arrived.
    Flush(oneshot::Sender<WeirResult<()>>),
    /// Take a checkpoint now (the `CHECKPOINT` statement); answers with its epoch, or 0
    /// when the dataflow does not checkpoint.
    Checkpoint(oneshot::Sender<WeirResult<u64>>),
}

/// The handle of a running dataflow: dropping it stops the dataflow's thread.
pub struct RunningDataflow {
    /// Sends [`Control`] to the dataflow's loop; the loop exits when this closes.
    control: mpsc::Sender<Control>,
    /// The dataflow's progress (its error, once stopped), shared with its thread.
    progress: Arc<Mutex<Progress>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningDataflow {
    /// Resolves when the view reflects everything published before the call.
    pub async fn flush(&self) -> WeirResult<()> {
        self.flush_handle().flush().await
    }

    /// A handle that can ask for a flush without holding on to the dataflow (callers keep no
    /// lock across the wait).
    pub fn flush_handle(&self) -> FlushHandle {
        FlushHandle {
            control: self.control.clone(),
            progress: self.progress.clone(),
        }
    }
}

/// Asks a running dataflow for a flush; see [`RunningDataflow::flush`].
pub struct FlushHandle {
    /// A sender of the dataflow's control channel; it keeps the channel open while held.
    control: mpsc::Sender<Control>,
    progress: Arc<Mutex<Progress>>,
}

impl FlushHandle {
    pub async fn flush(&self) -> WeirResult<()> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Flush(tx))
            .await
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    /// Asks for a checkpoint now; resolves with its epoch once it is durable (0 when the
    /// dataflow does not checkpoint).
    pub async fn checkpoint(&self) -> WeirResult<u64> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(Control::Checkpoint(tx))
            .await
            .map_err(|_| self.stopped())?;
        rx.await.map_err(|_| self.stopped())?
    }

    fn stopped(&self) -> WeirError {
        let progress = self.progress.lock().unwrap_or_else(|p| p.into_inner());
        stopped(progress.error.as_ref())
    }
}

impl Drop for RunningDataflow {
    fn drop(&mut self) {
        // Closing the control channel ends the loop; the thread is detached, not joined, so
        // a DROP never waits on a long chunk.
        let (closed, _) = mpsc::channel(1);
        self.control = closed;
        drop(self.thread.take());
    }
}

/// 55000 for a FLUSH of a dataflow that stopped; `cause` is its error, when known.
fn stopped(cause: Option<&WeirError>) -> WeirError {
    let error = WeirError::new(
        SqlState("55000"),
        "the materialized view's dataflow has stopped",
    )
    .with_hint("see SHOW MATERIALIZED VIEWS for its error; drop and re-create the view");
    match cause {
        Some(e) => error.with_detail(e.to_string()),
        None => error,
    }
}

impl Dataflow {
    /// Makes the dataflow pausable by `flag` (see the field).
    pub fn with_pause(mut self, flag: Arc<std::sync::atomic::AtomicBool>) -> Self {
        self.paused = Some(flag);
        self
    }

    /// `EXPLAIN`: the tree, root first, one operator per line.
    pub fn explain(&self) -> Vec<String> {
        let mut lines = Vec::new();
        self.explain_at(self.root, 0, &mut lines);
        lines
    }

    fn explain_at(&self, at: Endpoint, depth: usize, lines: &mut Vec<String>) {
        let pad = "  ".repeat(depth);
        match at {
            Endpoint::Input(i) => {
                let input = &self.inputs[i];
                let mut line = format!("{pad}Input: {}", input.name);
                if let Some(w) = input.watermark {
                    line.push_str(&format!(
                        " watermark=column {} - {}ms",
                        w.column,
                        w.delay_ns / 1_000_000
                    ));
                }
                if input.drop_late {
                    line.push_str(" drop_late");
                }
                if input.source.append_only() {
                    line.push_str(" append-only");
                } else {
                    line.push_str(" updating");
                }
                lines.push(line);
            }
            Endpoint::Node(n) => {
                lines.push(format!("{pad}{}", self.nodes[n].op.describe()));
                for child in &self.nodes[n].children {
                    self.explain_at(*child, depth + 1, lines);
                }
            }
        }
    }

    /// Makes the dataflow checkpoint (see [`Checkpointing`]); it restores the latest
    /// checkpoint of the same fingerprint when it starts.
    pub fn with_checkpoints(mut self, checkpointing: Checkpointing) -> Self {
        self.checkpointing = Some(checkpointing);
        self
    }

    /// Starts the dataflow on a thread of its own, maintaining `output`.
    pub fn start(self, name: &str, output: ViewOutput) -> WeirResult<RunningDataflow> {
        self.start_output(name, Output::View(output))
    }

    /// Starts the dataflow on a thread of its own, maintaining a view or feeding a sink.
    /// With checkpoints, the latest checkpoint is restored first, here, so a view answers
    /// `SELECT` from its last committed epoch as soon as it is open.
    pub fn start_output(mut self, name: &str, output: Output) -> WeirResult<RunningDataflow> {
        let mut output = output;
        self.recover(&mut output)?;
        let (control, rx) = mpsc::channel(64);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| WeirError::internal(format!("dataflow runtime: {e}")))?;
        let progress = output.progress();
        let output_progress = output.progress();
        let view = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("weir-view-{name}"))
            .spawn(move || {
                // A panic in an operator is a Weir bug; it stops this view, not the server,
                // and shows as the view's error.
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    runtime.block_on(self.run(output, rx))
                }))
                .unwrap_or_else(|_| {
                    Err(WeirError::internal(
                        "the materialized view's dataflow panicked",
                    ))
                });
                if let Err(e) = result {
                    tracing::error!(view = %view, error = %e, "materialized view stopped");
                    progress.lock().unwrap_or_else(|p| p.into_inner()).error = Some(e);
                }
            })
            .map_err(|e| WeirError::internal(format!("starting dataflow thread: {e}")))?;
        Ok(RunningDataflow {
            control,
            progress: output_progress,
            thread: Some(thread),
        })
    }

    async fn run(
        mut self,
        mut output: Output,
        mut control: mpsc::Receiver<Control>,
    ) -> WeirResult<()> {
        let mut pending: Vec<PendingFlush> = Vec::new();
        let result = self.run_loop(&mut output, &mut control, &mut pending).await;
        if let Err(e) = &result {
            // Every FLUSH, now or later, gets the same error: the view stopped, and why.
            let error = stopped(Some(e));
            for (_, reply) in pending {
                let _ = reply.send(Err(error.clone()));
            }
            while let Ok(message) = control.try_recv() {
                match message {
                    Control::Flush(reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                    Control::Checkpoint(reply) => {
                        let _ = reply.send(Err(error.clone()));
                    }
                }
            }
        }
        result
    }

    /// Handles one control message; `false` when the channel closed (stop).
    async fn control(
        &mut self,
        message: Option<Control>,
        output: &mut Output,
        pending: &mut Vec<PendingFlush>,
    ) -> WeirResult<bool> {
        match message {
            Some(Control::Flush(reply)) => pending.push((self.published(), reply)),
            Some(Control::Checkpoint(reply)) => {
                let result = if self.checkpointing.is_some() {
                    self.checkpoint(output).await
                } else {
                    Ok(0)
                };
                let failed = result.as_ref().err().cloned();
                let _ = reply.send(result);
                if let Some(e) = failed {
                    return Err(e);
                }
            }
            None => return Ok(false),
        }
        Ok(true)
    }

    async fn run_loop(
        &mut self,
        output: &mut Output,
        control: &mut mpsc::Receiver<Control>,
        pending: &mut Vec<PendingFlush>,
    ) -> WeirResult<()> {
        if let Output::Sink(sink, _) = output {
            let restored = self.restored.take();
            sink.restore(self.epoch, restored.as_ref().map(|(_, b)| b.as_slice()))
                .await?;
        }
        if self.epoch == 0 {
            let mut out = Vec::new();
            for n in 0..self.nodes.len() {
                self.nodes[n].op.on_start(&mut out)?;
                let parent = self.nodes[n].parent;
                let batches = std::mem::take(&mut out);
                for batch in batches {
                    self.push(parent, batch, output)?;
                }
            }
        }
        let interval = self.checkpointing.as_ref().map(|c| c.interval);
        let mut next_checkpoint = interval.map(|i| tokio::time::Instant::now() + i);
        loop {
            loop {
                match control.try_recv() {
                    Ok(message) => {
                        if !self.control(Some(message), output, pending).await? {
                            return Ok(());
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            // A source may ask for a checkpoint early (its broker holds unacknowledged
            // messages until one covers them). With nothing read since the last checkpoint,
            // that one already covers the positions: say so instead of taking another.
            let mut wanted = self.checkpointing.is_some()
                && self.inputs.iter().any(|i| i.source.checkpoint_wanted());
            if wanted && !self.changed_since_checkpoint {
                for input in &mut self.inputs {
                    let positions = input.source.positions();
                    input.source.committed(&positions);
                }
                wanted = false;
            }
            if let Some(at) = next_checkpoint
                && (wanted || tokio::time::Instant::now() >= at)
            {
                let is_sink = matches!(output, Output::Sink(..));
                if (self.changed_since_checkpoint || is_sink)
                    && let Err(e) = self.checkpoint(output).await
                {
                    // A failed checkpoint is retried at the next interval; the error
                    // shows in weir_sinks. State is unchanged by the attempt.
                    tracing::warn!(error = %e, "checkpoint failed");
                    if let Some(c) = &self.checkpointing {
                        c.history
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .last_error = Some(e.to_string());
                    }
                }
                next_checkpoint = interval.map(|i| tokio::time::Instant::now() + i);
            }
            if let Output::Sink(sink, _) = output {
                sink.tick().await?;
            }
            let paused = self
                .paused
                .as_ref()
                .is_some_and(|p| p.load(std::sync::atomic::Ordering::Acquire));
            if paused {
                for (_, reply) in pending.drain(..) {
                    let _ = reply.send(Ok(()));
                }
                tokio::select! {
                    _ = tokio::time::sleep(IDLE_WAIT) => {}
                    message = control.recv() => {
                        if !self.control(message, output, pending).await? {
                            return Ok(());
                        }
                    }
                }
                continue;
            }
            let mut progressed = false;
            for i in 0..self.inputs.len() {
                let chunk = self.inputs[i].source.poll(POLL_MESSAGES_MAX)?;
                if let Some(chunk) = chunk {
                    progressed = true;
                    self.changed_since_checkpoint = true;
                    self.process(i, chunk, output)?;
                }
            }
            let positions: Vec<Vec<u64>> =
                self.inputs.iter().map(|i| i.source.positions()).collect();
            let mut i = 0;
            while i < pending.len() {
                if reached(&positions, &pending[i].0) {
                    let (_, reply) = pending.swap_remove(i);
                    let _ = reply.send(Ok(()));
                } else {
                    i += 1;
                }
            }
            if progressed {
                continue;
            }
            let idle_inputs = self.advance_idle_watermarks(output)?;
            let wait = if idle_inputs || matches!(output, Output::Sink(..)) {
                IDLE_WAIT / 5
            } else {
                IDLE_WAIT
            };
            let mut deadline = tokio::time::Instant::now() + wait;
            if let Some(at) = next_checkpoint {
                deadline = deadline.min(at);
            }
            let waits: Vec<_> = self
                .inputs
                .iter()
                .map(|i| Box::pin(i.source.wait(deadline)))
                .collect();
            let any_input = async {
                if waits.is_empty() {
                    tokio::time::sleep_until(deadline).await;
                } else {
                    futures::future::select_all(waits).await;
                }
            };
            tokio::select! {
                _ = any_input => {}
                message = control.recv() => {
                    if !self.control(message, output, pending).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Moves the watermark of inputs idle for longer than their `idle_timeout`: their event
    /// time is taken to advance with wall-clock time since their last message. Returns whether
    /// any input has an idle timeout (the loop then looks more often).
    fn advance_idle_watermarks(&mut self, output: &mut Output) -> WeirResult<bool> {
        let mut any = false;
        for i in 0..self.inputs.len() {
            let input = &mut self.inputs[i];
            let Some(spec) = input.watermark else {
                continue;
            };
            let Some(timeout_ms) = spec.idle_timeout_ms else {
                continue;
            };
            any = true;
            let (since, base) = input.last_activity;
            let idle = since.elapsed();
            if base == NO_WATERMARK || idle < Duration::from_millis(timeout_ms) {
                continue;
            }
            let advanced = base.saturating_add(i64::try_from(idle.as_nanos()).unwrap_or(i64::MAX));
            if advanced <= input.max_event_time {
                continue;
            }
            input.max_event_time = advanced;
            let w = spec.watermark(advanced);
            if let Some(stats) = &input.stats {
                stats.raise_watermark(w);
            }
            if w > input.sent_watermark {
                input.sent_watermark = w;
                let parent = input.parent;
                self.changed_since_checkpoint = true;
                self.push_watermark(parent, w, output)?;
            }
        }
        Ok(any)
    }

    /// Restores the latest checkpoint of this dataflow's fingerprint, if any: input
    /// positions and watermarks, operator state, the view's rows (a sink's part is kept for
    /// [`Sink::restore`] on the dataflow's thread). Each operator restores its last full
    /// entry in the chain, then applies the changes of the files after it.
    fn recover(&mut self, output: &mut Output) -> WeirResult<()> {
        let Some(c) = &self.checkpointing else {
            return Ok(());
        };
        let Some((manifest, files)) = c.store.latest()? else {
            return Ok(());
        };
        let versions_match = files
            .iter()
            .all(|f| SnapshotReader::new(f).u64().ok() == Some(SNAPSHOT_VERSION));
        if manifest.fingerprint != c.fingerprint || !versions_match {
            tracing::warn!(
                dir = %c.store.dir().display(),
                "checkpoint belongs to another definition or format; rebuilding from the inputs"
            );
            c.store.clear()?;
            return Ok(());
        }
        let mismatch = |what: &str| {
            WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!(
                    "checkpoint {} does not match the dataflow ({what})",
                    c.store.dir().display()
                ),
            )
        };
        let mut chain = Vec::with_capacity(files.len());
        for file in &files {
            let mut r = SnapshotReader::new(file);
            r.u64()?;
            if r.u64()? as usize != self.inputs.len() {
                return Err(mismatch("inputs"));
            }
            let mut inputs = Vec::with_capacity(self.inputs.len());
            for _ in 0..self.inputs.len() {
                let n = r.u64()? as usize;
                let positions = (0..n).map(|_| r.u64()).collect::<WeirResult<Vec<_>>>()?;
                inputs.push((positions, r.i64()?, r.i64()?));
            }
            if r.u64()? as usize != self.nodes.len() {
                return Err(mismatch("operators"));
            }
            let entries = (0..=self.nodes.len())
                .map(|_| Ok((r.u64()?, r.bytes()?)))
                .collect::<WeirResult<Vec<_>>>()?;
            chain.push(StateEntries { inputs, entries });
        }
        let last = chain.last().ok_or_else(|| mismatch("empty chain"))?;
        for (input, (positions, max_event_time, sent)) in self.inputs.iter_mut().zip(&last.inputs) {
            input.source.seek(positions)?;
            input.max_event_time = *max_event_time;
            input.sent_watermark = *sent;
            input.last_activity = (std::time::Instant::now(), input.max_event_time);
            if let Some(stats) = &input.stats {
                stats.raise_watermark(input.sent_watermark);
            }
        }
        for (n, node) in self.nodes.iter_mut().enumerate() {
            let (full, changes) =
                entry_chain(&chain, n).ok_or_else(|| mismatch("no full operator state"))?;
            node.op.restore(&mut SnapshotReader::new(full))?;
            for bytes in changes {
                node.op.restore_changes(&mut SnapshotReader::new(bytes))?;
            }
        }
        let (full, changes) =
            entry_chain(&chain, self.nodes.len()).ok_or_else(|| mismatch("no full root state"))?;
        match output {
            Output::View(view) => {
                let mut state = view.state.lock().unwrap_or_else(|p| p.into_inner());
                let schema = state.schema().clone();
                let rebuild = |batch: arrow::array::RecordBatch| {
                    arrow::array::RecordBatch::try_new(schema.clone(), batch.columns().to_vec())
                        .map_err(|_| mismatch("view columns"))
                };
                let mut rows = Vec::new();
                let mut rr = SnapshotReader::new(full);
                for _ in 0..rr.u64()? {
                    rows.push(ChangeBatch::inserts(rebuild(rr.batch()?)?));
                }
                let mut incremental = false;
                for bytes in changes {
                    incremental = true;
                    let mut rr = SnapshotReader::new(bytes);
                    if rr.u64()? == 1 {
                        let batch = rebuild(rr.batch()?)?;
                        let weights = rr.batch()?;
                        let weights = weights
                            .column(0)
                            .as_any()
                            .downcast_ref::<Int64Array>()
                            .cloned()
                            .ok_or_else(|| mismatch("view change weights"))?;
                        rows.push(ChangeBatch {
                            rows: batch,
                            weights: Some(weights),
                        });
                    }
                }
                if incremental {
                    // The rows and their changes net out in one pass; what remains is
                    // inserted (a retraction left over means the chain is damaged).
                    rows = consolidate(&schema, &rows)?.into_iter().collect();
                    if let Some(w) = rows.first().and_then(|c| c.weights.as_ref())
                        && w.values().iter().any(|&w| w < 0)
                    {
                        return Err(mismatch("view changes retract missing rows"));
                    }
                }
                for change in &rows {
                    state.apply(change)?;
                }
                view.progress.lock().unwrap_or_else(|p| p.into_inner()).rows =
                    state.num_rows() as u64;
            }
            Output::Sink(..) => self.restored = Some((manifest.epoch, full.to_vec())),
        }
        self.epoch = manifest.epoch;
        self.root_changes.reset();
        self.last_checkpoint = Some(manifest.clone());
        let mut history = c.history.lock().unwrap_or_else(|p| p.into_inner());
        history.restored_epoch = Some(manifest.epoch);
        history.recent.push_back(manifest);
        Ok(())
    }

    /// Takes checkpoint `epoch + 1`: every input's position, every operator's state and the
    /// root's (a view's rows; a sink pre-commits), written durably; then a sink commits.
    /// The dataflow runs its operators one batch at a time, so between two rounds every
    /// operator has seen exactly the input up to the recorded positions: the barrier is
    /// aligned by construction. While the chain may grow (see [`CHAIN_FILES_MAX`]),
    /// operators that keep a change set and the view write only what changed.
    async fn checkpoint(&mut self, output: &mut Output) -> WeirResult<u64> {
        let Some(c) = &self.checkpointing else {
            return Ok(0);
        };
        let started = std::time::Instant::now();
        let taken_at_ms = chrono::Utc::now().timestamp_millis();
        let epoch = self.epoch + 1;
        let previous = self.last_checkpoint.take();
        let incremental = previous.as_ref().is_some_and(extends_chain);
        let mut w = SnapshotWriter::new();
        w.u64(SNAPSHOT_VERSION);
        w.u64(self.inputs.len() as u64);
        let positions: Vec<Vec<u64>> = self.inputs.iter().map(|i| i.source.positions()).collect();
        for (input, positions) in self.inputs.iter().zip(&positions) {
            w.u64(positions.len() as u64);
            for &p in positions {
                w.u64(p);
            }
            w.i64(input.max_event_time);
            w.i64(input.sent_watermark);
        }
        w.u64(self.nodes.len() as u64);
        // Whether any entry holds only changes: if none does, this epoch starts a new chain.
        let mut wrote_changes = false;
        for node in &mut self.nodes {
            let mut nw = SnapshotWriter::new();
            if incremental && node.op.snapshot_changes(&mut nw)? {
                wrote_changes = true;
                w.u64(ENTRY_CHANGES);
            } else {
                nw = SnapshotWriter::new();
                node.op.snapshot(&mut nw)?;
                w.u64(ENTRY_FULL);
            }
            w.bytes(&nw.finish());
        }
        let changes = std::mem::take(&mut self.root_changes);
        self.root_changes.reset();
        match output {
            Output::View(view) if incremental && changes.tracking && !changes.overflow => {
                let schema = view
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .schema()
                    .clone();
                let mut rw = SnapshotWriter::new();
                match consolidate(&schema, &changes.batches)? {
                    Some(net) => {
                        rw.u64(1);
                        rw.batch(&net.rows)?;
                        let weights: arrow::array::ArrayRef =
                            Arc::new(net.weights.ok_or_else(|| {
                                WeirError::internal("view changes without weights")
                            })?);
                        let weights =
                            arrow::array::RecordBatch::try_from_iter([("weight", weights)])
                                .map_err(|e| WeirError::internal(format!("view changes: {e}")))?;
                        rw.batch(&weights)?;
                    }
                    None => rw.u64(0),
                }
                wrote_changes = true;
                w.u64(ENTRY_CHANGES);
                w.bytes(&rw.finish());
            }
            Output::View(view) => {
                let batches = view
                    .state
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .snapshot();
                let mut rw = SnapshotWriter::new();
                rw.u64(batches.len() as u64);
                for b in &batches {
                    rw.batch(b)?;
                }
                w.u64(ENTRY_FULL);
                w.bytes(&rw.finish());
            }
            Output::Sink(sink, _) => {
                w.u64(ENTRY_FULL);
                w.bytes(&sink.precommit(epoch).await?);
            }
        }
        let state = w.finish();
        let manifest = Manifest {
            epoch,
            taken_at_ms,
            duration_ms: 0,
            bytes: 0,
            fingerprint: c.fingerprint.clone(),
            incremental: wrote_changes,
            chain: Vec::new(),
        };
        let manifest = c
            .store
            .commit(manifest, previous.as_ref(), &state, started)?;
        self.epoch = epoch;
        self.last_checkpoint = Some(manifest.clone());
        self.changed_since_checkpoint = false;
        if let Output::Sink(sink, _) = output {
            // The epoch is durable: its output must become visible. A failing store is
            // retried with backoff; if it keeps failing the sink stops with the error and
            // recovery commits the epoch again on restart.
            let mut delay = Duration::from_millis(200);
            let mut attempt = 0;
            loop {
                match sink.commit(epoch).await {
                    Ok(()) => break,
                    Err(e) if attempt < 5 => {
                        attempt += 1;
                        tracing::warn!(error = %e, attempt, "sink commit failed; retrying");
                        c.history
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .last_error =
                            Some(format!("commit of epoch {epoch} failed (retrying): {e}"));
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        // Committed: the sources may acknowledge upstream what the epoch covers.
        for (input, positions) in self.inputs.iter_mut().zip(&positions) {
            input.source.committed(positions);
        }
        let mut history = c.history.lock().unwrap_or_else(|p| p.into_inner());
        history.recent.push_back(manifest);
        while history.recent.len() > CHECKPOINT_HISTORY {
            history.recent.pop_front();
        }
        history.last_error = None;
        Ok(epoch)
    }

    fn published(&self) -> Vec<Vec<u64>> {
        self.inputs.iter().map(|i| i.source.published()).collect()
    }

    /// One chunk of input `i`: stats, lateness, rows up the tree, then the watermark.
    fn process(&mut self, i: usize, chunk: SourceChunk, output: &mut Output) -> WeirResult<()> {
        let input = &mut self.inputs[i];
        let mut changes = chunk.changes;
        let mut late_rows = Vec::new();
        let mut watermark = None;
        if let Some(spec) = input.watermark {
            let times = changes
                .rows
                .column(spec.column)
                .as_any()
                .downcast_ref::<TimestampNanosecondArray>()
                .ok_or_else(|| WeirError::internal("event-time column is not a timestamp"))?
                .clone();
            let before = input.max_event_time;
            let (late, max_event_time) = spec.late_rows(&times, before)?;
            input.max_event_time = max_event_time;
            input.last_activity = (std::time::Instant::now(), max_event_time);
            watermark = Some(spec.watermark(max_event_time));
            if input.drop_late && !late.is_empty() {
                let mut keep = vec![true; times.len()];
                for &(row, _) in &late {
                    keep[row] = false;
                }
                changes = filter_change(&changes, &BooleanArray::from(keep))?;
            }
            late_rows = late
                .into_iter()
                .map(|(row, met)| LateRow {
                    partition: chunk.partition,
                    offset: chunk.offsets[row],
                    event_time: times.value(row),
                    watermark: met,
                })
                .collect();
        }
        if let Some(stats) = &input.stats {
            let end = input.source.positions()[chunk.partition as usize];
            stats.record(
                chunk.partition,
                end,
                &chunk.offsets,
                &chunk.bad,
                late_rows,
                watermark.unwrap_or(NO_WATERMARK),
            );
        }
        let parent = input.parent;
        if changes.num_rows() > 0 {
            self.push(parent, changes, output)?;
        }
        if let Some(w) = watermark {
            let input = &mut self.inputs[i];
            if w > input.sent_watermark {
                input.sent_watermark = w;
                self.push_watermark(parent, w, output)?;
            }
        }
        Ok(())
    }

    fn push(&mut self, at: Parent, batch: ChangeBatch, output: &mut Output) -> WeirResult<()> {
        match at {
            Parent::Root => match output {
                Output::View(output) => {
                    let mut state = output.state.lock().unwrap_or_else(|p| p.into_inner());
                    let schema = state.schema().clone();
                    let batch = super::with_schema(batch, &schema)?;
                    state.apply(&batch)?;
                    self.root_changes.record(&batch, state.num_rows());
                    output
                        .progress
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .rows = state.num_rows() as u64;
                    Ok(())
                }
                Output::Sink(sink, progress) => {
                    sink.write(&batch)?;
                    progress.lock().unwrap_or_else(|p| p.into_inner()).rows +=
                        batch.num_rows() as u64;
                    Ok(())
                }
            },
            Parent::None => Err(WeirError::internal("dataflow node without a parent")),
            Parent::Node(n, k) => {
                let mut out = Vec::new();
                self.nodes[n].op.on_batch(k, batch, &mut out)?;
                let parent = self.nodes[n].parent;
                for b in out {
                    if b.num_rows() > 0 {
                        self.push(parent, b, output)?;
                    }
                }
                Ok(())
            }
        }
    }

    fn push_watermark(&mut self, at: Parent, w: EventTime, output: &mut Output) -> WeirResult<()> {
        let Parent::Node(n, k) = at else {
            return Ok(());
        };
        let mut out = Vec::new();
        let forward = self.nodes[n].op.on_watermark(k, w, &mut out)?;
        let parent = self.nodes[n].parent;
        for b in out {
            if b.num_rows() > 0 {
                self.push(parent, b, output)?;
            }
        }
        if let Some(w) = forward {
            self.push_watermark(parent, w, output)?;
        }
        Ok(())
    }
}

fn reached(positions: &[Vec<u64>], targets: &[Vec<u64>]) -> bool {
    positions
        .iter()
        .zip(targets)
        .all(|(pos, target)| pos.iter().zip(target).all(|(p, t)| p >= t))
}

/// Keeps the rows (and weights) where `keep` is true.
pub(crate) fn filter_change(change: &ChangeBatch, keep: &BooleanArray) -> WeirResult<ChangeBatch> {
    let rows = filter_record_batch(&change.rows, keep)
        .map_err(|e| WeirError::internal(format!("filtering rows: {e}")))?;
    let weights = match &change.weights {
        Some(w) => {
            let f = arrow::compute::filter(w, keep)
                .map_err(|e| WeirError::internal(format!("filtering weights: {e}")))?;
            Some(
                f.as_any()
                    .downcast_ref::<Int64Array>()
                    .ok_or_else(|| WeirError::internal("weights are not bigint"))?
                    .clone(),
            )
        }
        None => None,
    };
    Ok(ChangeBatch { rows, weights })
}
