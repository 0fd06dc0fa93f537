//! [`ExchangeOperator`]: runs N instances of a keyed operator, each on a worker thread of its
//! own, behind a hash exchange on the key (`SET streaming_parallelism = N`).
//!
//! Each input batch is split by a hash of its key columns (the same key always reaches the
//! same instance, so per-key state stays in one place); the parts go to the workers over
//! bounded channels and the operator waits for all of them, so the dataflow keeps its order of
//! batches and watermarks (a watermark goes to every instance). Outputs are concatenated in
//! instance order. The view is a set, so its rows are the same for every N.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use arrow::array::UInt32Array;
use arrow::compute::take_record_batch;
use arrow::row::{RowConverter, SortField};
use datafusion::physical_expr::PhysicalExpr;

use super::project::eval_error;
use super::{EventTime, Operator};
use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirError, WeirResult};

enum Job {
    Start,
    Batch(ChangeBatch),
    Watermark(EventTime),
    Snapshot,
    SnapshotChanges,
    Restore(Vec<u8>),
    RestoreChanges(Vec<u8>),
}

/// Output batches, the watermark passed on, and a snapshot's bytes (`Job::Snapshot`, and
/// `Job::SnapshotChanges` when the instance keeps a change set).
type Reply = WeirResult<(Vec<ChangeBatch>, Option<EventTime>, InstanceState)>;

/// One instance's snapshot bytes, if its job made some.
type InstanceState = Option<Vec<u8>>;

struct Worker {
    /// Jobs for the worker; dropping it ends the worker's loop.
    jobs: SyncSender<Job>,
    /// The worker's answer to each job, in order.
    replies: Receiver<Reply>,
    describe: String,
}

pub struct ExchangeOperator {
    keys: Vec<Arc<dyn PhysicalExpr>>,
    converter: RowConverter,
    workers: Vec<Worker>,
}

impl ExchangeOperator {
    /// `instances` are the N operators (built alike); `keys` their partitioning expressions,
    /// `key_schema` the input schema the keys are evaluated against.
    pub fn try_new(
        keys: Vec<Arc<dyn PhysicalExpr>>,
        key_schema: &arrow::datatypes::Schema,
        instances: Vec<Box<dyn Operator>>,
        name: &str,
    ) -> WeirResult<Self> {
        let fields = keys
            .iter()
            .map(|k| k.data_type(key_schema).map(SortField::new))
            .collect::<Result<Vec<_>, _>>()
            .map_err(eval_error)?;
        let converter = RowConverter::new(fields)
            .map_err(|e| WeirError::internal(format!("exchange keys: {e}")))?;
        let mut workers = Vec::with_capacity(instances.len());
        for (i, mut op) in instances.into_iter().enumerate() {
            let describe = op.describe();
            let (jobs, job_rx) = sync_channel::<Job>(4);
            let (reply_tx, replies) = sync_channel::<Reply>(4);
            std::thread::Builder::new()
                .name(format!("weir-{name}-{i}"))
                .spawn(move || {
                    while let Ok(job) = job_rx.recv() {
                        let mut out = Vec::new();
                        let mut state = None;
                        let result = match job {
                            Job::Start => op.on_start(&mut out).map(|_| None),
                            Job::Batch(b) => op.on_batch(0, b, &mut out).map(|_| None),
                            Job::Watermark(w) => op.on_watermark(0, w, &mut out),
                            Job::Snapshot => {
                                let mut w = SnapshotWriter::new();
                                let r = op.snapshot(&mut w);
                                state = Some(w.finish());
                                r.map(|_| None)
                            }
                            Job::SnapshotChanges => {
                                let mut w = SnapshotWriter::new();
                                let r = op.snapshot_changes(&mut w);
                                if matches!(r, Ok(true)) {
                                    state = Some(w.finish());
                                }
                                r.map(|_| None)
                            }
                            Job::Restore(bytes) => {
                                let mut r = SnapshotReader::new(&bytes);
                                op.restore(&mut r).map(|_| None)
                            }
                            Job::RestoreChanges(bytes) => {
                                let mut r = SnapshotReader::new(&bytes);
                                op.restore_changes(&mut r).map(|_| None)
                            }
                        };
                        if reply_tx.send(result.map(|w| (out, w, state))).is_err() {
                            break;
                        }
                    }
                })
                .map_err(|e| WeirError::internal(format!("starting exchange worker: {e}")))?;
            workers.push(Worker {
                jobs,
                replies,
                describe,
            });
        }
        Ok(ExchangeOperator {
            keys,
            converter,
            workers,
        })
    }

    fn gone() -> WeirError {
        WeirError::internal("an exchange worker stopped")
    }

    /// Sends one job per worker (`None`: nothing for it) and gathers the replies.
    fn round(
        &mut self,
        jobs: Vec<Option<Job>>,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        self.round_with_state(jobs, out).map(|(w, _)| w)
    }

    /// [`Self::round`], also returning each worker's snapshot bytes.
    fn round_with_state(
        &mut self,
        jobs: Vec<Option<Job>>,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<(Option<EventTime>, Vec<InstanceState>)> {
        let mut states = Vec::with_capacity(jobs.len());
        let mut sent = Vec::with_capacity(jobs.len());
        for (worker, job) in self.workers.iter().zip(jobs) {
            let has = job.is_some();
            if let Some(job) = job {
                worker.jobs.send(job).map_err(|_| Self::gone())?;
            }
            sent.push(has);
        }
        let mut watermark: Option<EventTime> = None;
        for (worker, has) in self.workers.iter().zip(sent) {
            if !has {
                states.push(None);
                continue;
            }
            let (batches, w, state) = worker.replies.recv().map_err(|_| Self::gone())??;
            out.extend(batches);
            states.push(state);
            if let Some(w) = w {
                watermark = Some(watermark.map_or(w, |m| m.min(w)));
            }
        }
        Ok((watermark, states))
    }
}

impl Operator for ExchangeOperator {
    fn describe(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(|k| k.to_string()).collect();
        format!(
            "Exchange: hash({}) to {} instances of {}",
            keys.join(", "),
            self.workers.len(),
            self.workers.first().map_or("", |w| w.describe.as_str())
        )
    }

    fn on_start(&mut self, out: &mut Vec<ChangeBatch>) -> WeirResult<()> {
        let jobs = self.workers.iter().map(|_| Some(Job::Start)).collect();
        self.round(jobs, out)?;
        Ok(())
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        let arrays = super::evaluate(&self.keys, &batch.rows)?;
        let rows = self
            .converter
            .convert_columns(&arrays)
            .map_err(|e| WeirError::internal(format!("exchange keys: {e}")))?;
        let shards = self.workers.len();
        let mut parts: Vec<Vec<u32>> = vec![Vec::new(); shards];
        for (i, row) in rows.iter().enumerate() {
            let mut h = std::collections::hash_map::DefaultHasher::new();
            row.as_ref().hash(&mut h);
            parts[(h.finish() % shards as u64) as usize].push(i as u32);
        }
        let mut jobs = Vec::with_capacity(shards);
        for part in parts {
            if part.is_empty() {
                jobs.push(None);
                continue;
            }
            let idx = UInt32Array::from(part);
            let rows = take_record_batch(&batch.rows, &idx)
                .map_err(|e| WeirError::internal(format!("exchange: {e}")))?;
            let weights = super::take_weights(batch.weights.as_ref(), &idx)?;
            jobs.push(Some(Job::Batch(ChangeBatch { rows, weights })));
        }
        self.round(jobs, out)?;
        Ok(())
    }

    fn on_watermark(
        &mut self,
        _input: usize,
        watermark: EventTime,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        let jobs = self
            .workers
            .iter()
            .map(|_| Some(Job::Watermark(watermark)))
            .collect();
        self.round(jobs, out)
    }

    fn snapshot(&mut self, out: &mut SnapshotWriter) -> WeirResult<()> {
        let jobs = self.workers.iter().map(|_| Some(Job::Snapshot)).collect();
        let (_, states) = self.round_with_state(jobs, &mut Vec::new())?;
        out.u64(states.len() as u64);
        for state in states {
            out.bytes(&state.unwrap_or_default());
        }
        Ok(())
    }

    fn restore(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        let jobs = self.instance_states(from, Job::Restore)?;
        self.round(jobs, &mut Vec::new())?;
        Ok(())
    }

    /// Every instance's changes, or false when one keeps no change set (the instances that
    /// wrote theirs are then covered by the full snapshot the runtime takes next).
    fn snapshot_changes(&mut self, out: &mut SnapshotWriter) -> WeirResult<bool> {
        let jobs = self
            .workers
            .iter()
            .map(|_| Some(Job::SnapshotChanges))
            .collect();
        let (_, states) = self.round_with_state(jobs, &mut Vec::new())?;
        let Some(states) = states.into_iter().collect::<Option<Vec<_>>>() else {
            return Ok(false);
        };
        out.u64(states.len() as u64);
        for state in states {
            out.bytes(&state);
        }
        Ok(true)
    }

    fn restore_changes(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        let jobs = self.instance_states(from, Job::RestoreChanges)?;
        self.round(jobs, &mut Vec::new())?;
        Ok(())
    }
}

impl ExchangeOperator {
    /// Reads one state per instance (as [`Operator::snapshot`] wrote them) into jobs.
    fn instance_states(
        &self,
        from: &mut SnapshotReader<'_>,
        job: fn(Vec<u8>) -> Job,
    ) -> WeirResult<Vec<Option<Job>>> {
        let n = from.u64()? as usize;
        if n != self.workers.len() {
            return Err(WeirError::internal(format!(
                "checkpoint has {n} instances, the exchange {}",
                self.workers.len()
            )));
        }
        (0..n)
            .map(|_| from.bytes().map(|b| Some(job(b.to_vec()))))
            .collect()
    }
}
