//! [`AckGate`]: queue-mode acknowledgements held until the checkpoints that cover them
//! (`ack = 'checkpoint'`, the default).
//!
//! Every dataflow that reads a RabbitMQ source's log (its views, its sinks, its monitor) reads
//! it through a [`GatedReader`], which tells the gate the log position of each checkpoint it
//! committed (and the one recovery restored). The ingest acknowledges a delivery to RabbitMQ
//! only once its log offset is below every active reader's committed position: RabbitMQ then
//! holds every message some checkpoint has not covered yet, and its queue depth shows how far
//! behind Weir is. A monitor resting while views read the source is not an active reader.
//!
//! RabbitMQ stops delivering once `prefetch` messages are unacknowledged, so while that many are
//! held the ingest asks the readers for a checkpoint ([`AckGate::want_checkpoint`]); they take
//! one at their next round instead of waiting for their interval.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::connector::api::{Source, SourceChunk};
use crate::types::WeirResult;

/// Shared by a source's ingest and the readers of its log.
#[derive(Debug, Default)]
pub struct AckGate {
    readers: Mutex<HashMap<u64, Reader>>,
    next_id: AtomicU64,
    /// Woken when a reader commits, arrives or leaves (one waiter, the ingest: a wake-up
    /// while it is busy is kept for its next wait).
    changed: tokio::sync::Notify,
    /// Bumped by the ingest to ask for checkpoints; each reader remembers what it answered.
    wanted: AtomicU64,
    /// Wakes the readers waiting for input when a checkpoint is wanted (they have read
    /// everything, and nothing new comes while RabbitMQ waits for acks).
    wanted_changed: tokio::sync::Notify,
}

#[derive(Debug)]
struct Reader {
    /// The log offset before which this reader's last committed checkpoint covers everything.
    committed: u64,
    /// While set the reader is not counted (a source's monitor resting while views read).
    paused: Option<Arc<AtomicBool>>,
}

impl AckGate {
    pub fn new() -> Arc<AckGate> {
        Arc::new(AckGate::default())
    }

    /// Wraps a reader of the source's log (partition 0: broker sources have one).
    /// `paused`: the monitor's rest flag.
    pub fn reader(
        self: &Arc<Self>,
        inner: Box<dyn Source>,
        paused: Option<Arc<AtomicBool>>,
    ) -> Box<dyn Source> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let committed = inner.positions().first().copied().unwrap_or(0);
        lock(&self.readers).insert(id, Reader { committed, paused });
        self.changed.notify_one();
        Box::new(GatedReader {
            inner,
            gate: self.clone(),
            id,
            answered: self.wanted.load(Ordering::Acquire),
        })
    }

    /// The offset below which every active reader has committed a checkpoint; `None` while no
    /// reader is active (nothing may be acknowledged yet: the views have not started).
    pub fn covered(&self) -> Option<u64> {
        lock(&self.readers)
            .values()
            .filter(|r| !r.paused.as_ref().is_some_and(|p| p.load(Ordering::Acquire)))
            .map(|r| r.committed)
            .min()
    }

    /// Returns after a reader committed, arrived or left (or spuriously); cancel-safe.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// Asks every reader for a checkpoint at its next round.
    pub fn want_checkpoint(&self) {
        self.wanted.fetch_add(1, Ordering::AcqRel);
        self.wanted_changed.notify_waiters();
    }

    fn commit(&self, id: u64, committed: u64) {
        if let Some(r) = lock(&self.readers).get_mut(&id) {
            r.committed = committed;
        }
        self.changed.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A reader of the source's log that reports its checkpoints to the [`AckGate`].
struct GatedReader {
    inner: Box<dyn Source>,
    gate: Arc<AckGate>,
    id: u64,
    /// The last `wanted` value a checkpoint answered.
    answered: u64,
}

#[async_trait]
impl Source for GatedReader {
    fn poll(&mut self, max_messages: usize) -> WeirResult<Option<SourceChunk>> {
        self.inner.poll(max_messages)
    }

    fn positions(&self) -> Vec<u64> {
        self.inner.positions()
    }

    fn published(&self) -> Vec<u64> {
        self.inner.published()
    }

    /// Also returns when a checkpoint is wanted, so the dataflow takes it at once.
    async fn wait(&self, deadline: tokio::time::Instant) {
        let wanted = self.gate.wanted_changed.notified();
        tokio::pin!(wanted);
        wanted.as_mut().enable();
        if self.checkpoint_wanted() {
            return;
        }
        tokio::select! {
            _ = self.inner.wait(deadline) => {}
            _ = wanted => {}
        }
    }

    fn append_only(&self) -> bool {
        self.inner.append_only()
    }

    /// Recovery resumes here: the restored checkpoint covers what is before it.
    fn seek(&mut self, positions: &[u64]) -> WeirResult<()> {
        self.inner.seek(positions)?;
        self.committed(positions);
        Ok(())
    }

    fn committed(&mut self, positions: &[u64]) {
        self.answered = self.gate.wanted.load(Ordering::Acquire);
        if let Some(&p) = positions.first() {
            self.gate.commit(self.id, p);
        }
    }

    fn checkpoint_wanted(&self) -> bool {
        self.gate.wanted.load(Ordering::Acquire) > self.answered
    }
}

impl Drop for GatedReader {
    fn drop(&mut self) {
        lock(&self.gate.readers).remove(&self.id);
        self.gate.changed.notify_one();
    }
}
