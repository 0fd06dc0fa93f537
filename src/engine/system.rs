//! System relations, computed when scanned: `weir_topics` (one row per topic
//! partition), `weir_subscriptions` (one row per subscription partition),
//! `weir_sources`, `weir_source_stats`, `weir_late_rows`, `weir_dead_letters` and
//! `weir_materialized_views`; the same figures feed the `SHOW` statements and
//! `/metrics`.

use std::fmt;
use std::sync::{Arc, Weak};

use arrow::array::{
    ArrayRef, Int32Array, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session as DfSession, TableProvider};
use datafusion::common::DataFusionError;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;

use super::{Inner, Weir};
use crate::connector::rabbitmq::IngestSnapshot;
use crate::queue::subscription::SubscriptionMode;

/// One topic partition's figures.
#[derive(Debug, Clone)]
pub struct TopicPartitionStats {
    pub topic: String,
    pub partition: u32,
    pub partitions: u32,
    /// Retained messages in this partition.
    pub messages: u64,
    /// Bytes retained by the whole topic (the log does not split them per partition).
    pub topic_bytes: u64,
    pub oldest_offset: u64,
    pub next_offset: u64,
}

/// One subscription partition's figures.
#[derive(Debug, Clone)]
pub struct SubscriptionPartitionStats {
    pub subscription: String,
    pub mode: &'static str,
    pub partition: u32,
    pub lag: u64,
    /// Subscription-wide counts, repeated on each partition's row.
    pub in_flight: u64,
    pub redeliveries: u64,
    pub dead_lettered: u64,
}

impl Weir {
    /// Current figures of every topic partition, sorted by topic and partition.
    pub fn topic_stats(&self) -> Vec<TopicPartitionStats> {
        let mut rows = Vec::new();
        for (name, topic) in self.open_topics() {
            let stats = topic.stats();
            for partition in 0..stats.partitions {
                let oldest = stats
                    .oldest_offsets
                    .get(partition as usize)
                    .copied()
                    .unwrap_or(0);
                let next = stats
                    .next_offsets
                    .get(partition as usize)
                    .copied()
                    .unwrap_or(0);
                rows.push(TopicPartitionStats {
                    topic: name.clone(),
                    partition,
                    partitions: stats.partitions,
                    messages: next.saturating_sub(oldest),
                    topic_bytes: stats.bytes,
                    oldest_offset: oldest,
                    next_offset: next,
                });
            }
        }
        rows
    }

    /// Current figures of every subscription partition.
    pub fn subscription_stats(&self) -> Vec<SubscriptionPartitionStats> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut rows = Vec::new();
        for (name, sub) in self.open_subscriptions() {
            let stats = sub.stats(now);
            let mode = match stats.mode {
                SubscriptionMode::Stream => "stream",
                SubscriptionMode::Queue => "queue",
            };
            for (partition, lag) in stats.lag.iter().enumerate() {
                rows.push(SubscriptionPartitionStats {
                    subscription: name.clone(),
                    mode,
                    partition: partition as u32,
                    lag: *lag,
                    in_flight: stats.in_flight,
                    redeliveries: stats.redeliveries,
                    dead_lettered: stats.dead_lettered,
                });
            }
        }
        rows
    }

    /// Registers the system relations in the DataFusion context.
    pub(super) fn register_system_tables(&self) -> datafusion::error::Result<()> {
        for kind in [
            SystemKind::Topics,
            SystemKind::Subscriptions,
            SystemKind::Sources,
            SystemKind::SourceStats,
            SystemKind::LateRows,
            SystemKind::DeadLetters,
            SystemKind::MaterializedViews,
            SystemKind::Sinks,
            SystemKind::Checkpoints,
        ] {
            let table = SystemTable {
                kind,
                weir: Arc::downgrade(&self.inner),
            };
            self.inner
                .ctx
                .register_table(kind.name(), Arc::new(table))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum SystemKind {
    Topics,
    Subscriptions,
    Sources,
    SourceStats,
    LateRows,
    DeadLetters,
    MaterializedViews,
    Sinks,
    Checkpoints,
}

impl SystemKind {
    fn name(&self) -> &'static str {
        match self {
            SystemKind::Topics => "weir_topics",
            SystemKind::Subscriptions => "weir_subscriptions",
            SystemKind::Sources => "weir_sources",
            SystemKind::SourceStats => "weir_source_stats",
            SystemKind::LateRows => "weir_late_rows",
            SystemKind::DeadLetters => "weir_dead_letters",
            SystemKind::MaterializedViews => "weir_materialized_views",
            SystemKind::Sinks => "weir_sinks",
            SystemKind::Checkpoints => "weir_checkpoints",
        }
    }

    fn schema(&self) -> SchemaRef {
        let fields = match self {
            SystemKind::Topics => vec![
                Field::new("topic", DataType::Utf8, false),
                Field::new("partition", DataType::Int32, false),
                Field::new("partitions", DataType::Int32, false),
                Field::new("messages", DataType::Int64, false),
                Field::new("topic_bytes", DataType::Int64, false),
                Field::new("oldest_offset", DataType::Int64, false),
                Field::new("next_offset", DataType::Int64, false),
            ],
            SystemKind::Subscriptions => vec![
                Field::new("subscription", DataType::Utf8, false),
                Field::new("mode", DataType::Utf8, false),
                Field::new("partition", DataType::Int32, false),
                Field::new("lag", DataType::Int64, false),
                Field::new("in_flight", DataType::Int64, false),
                Field::new("redeliveries", DataType::Int64, false),
                Field::new("dead_lettered", DataType::Int64, false),
            ],
            SystemKind::Sources => vec![
                Field::new("source", DataType::Utf8, false),
                Field::new("topic", DataType::Utf8, false),
                Field::new("format", DataType::Utf8, false),
                Field::new("watermark", DataType::Utf8, true),
                Field::new("delivery", DataType::Utf8, false),
                // The ingest of a broker source (`running` for the others) and its counters
                // (NULL for sources Weir writes itself).
                Field::new("status", DataType::Utf8, false),
                Field::new("last_error", DataType::Utf8, true),
                Field::new("received", DataType::Int64, true),
                Field::new("appended", DataType::Int64, true),
                Field::new("acked", DataType::Int64, true),
                Field::new("duplicates", DataType::Int64, true),
                Field::new("rejected", DataType::Int64, true),
                Field::new("reconnects", DataType::Int64, true),
            ],
            SystemKind::SourceStats => vec![
                Field::new("source", DataType::Utf8, false),
                Field::new("messages", DataType::Int64, false),
                Field::new("dead_letters", DataType::Int64, false),
                Field::new("late_rows", DataType::Int64, false),
                Field::new("watermark", ts(), true),
            ],
            SystemKind::LateRows => vec![
                Field::new("source", DataType::Utf8, false),
                Field::new("partition", DataType::Int32, false),
                Field::new("offset", DataType::Int64, false),
                Field::new("event_time", ts(), false),
                Field::new("watermark", ts(), false),
            ],
            SystemKind::DeadLetters => vec![
                Field::new("source", DataType::Utf8, false),
                Field::new("partition", DataType::Int32, false),
                Field::new("offset", DataType::Int64, false),
                Field::new("reason", DataType::Utf8, false),
                Field::new("payload", DataType::Utf8, false),
            ],
            SystemKind::MaterializedViews => vec![
                Field::new("view", DataType::Utf8, false),
                Field::new("emit", DataType::Utf8, false),
                Field::new("rows", DataType::Int64, false),
                Field::new("status", DataType::Utf8, false),
                Field::new("definition", DataType::Utf8, false),
            ],
            SystemKind::Sinks => vec![
                Field::new("sink", DataType::Utf8, false),
                Field::new("from_view", DataType::Utf8, false),
                Field::new("connector", DataType::Utf8, false),
                Field::new("target", DataType::Utf8, false),
                Field::new("rows", DataType::Int64, false),
                Field::new("status", DataType::Utf8, false),
                Field::new("delivery", DataType::Utf8, false),
                Field::new("last_epoch", DataType::Int64, true),
            ],
            SystemKind::Checkpoints => vec![
                Field::new("dataflow", DataType::Utf8, false),
                Field::new("kind", DataType::Utf8, false),
                Field::new("epoch", DataType::Int64, false),
                Field::new(
                    "taken_at",
                    DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
                    false,
                ),
                Field::new("duration_ms", DataType::Int64, false),
                Field::new("bytes", DataType::Int64, false),
                Field::new("incremental", DataType::Boolean, false),
                Field::new("chain_files", DataType::Int64, false),
                Field::new("chain_bytes", DataType::Int64, false),
                Field::new("restored", DataType::Boolean, false),
            ],
        };
        Arc::new(Schema::new(fields))
    }

    fn rows(&self, weir: &Weir) -> Vec<ArrayRef> {
        match self {
            SystemKind::Sources => {
                let s = weir.open_sources();
                let ingest: Vec<_> = s.iter().map(|s| s.ingest_status()).collect();
                let counter = |rows: &[Option<IngestSnapshot>], f: fn(&IngestSnapshot) -> u64| {
                    Arc::new(Int64Array::from_iter(
                        rows.iter().map(|i| i.as_ref().map(|i| f(i) as i64)),
                    )) as ArrayRef
                };
                vec![
                    strings(s.iter().map(|s| s.relation.name.clone())),
                    strings(s.iter().map(|s| s.origin())),
                    strings(s.iter().map(|s| s.format.name().to_string())),
                    Arc::new(StringArray::from_iter(
                        s.iter().map(|s| s.watermark_text.clone()),
                    )),
                    strings(s.iter().map(|s| s.delivery().to_string())),
                    strings(s.iter().map(|s| s.status())),
                    Arc::new(StringArray::from_iter(
                        ingest
                            .iter()
                            .map(|i| i.as_ref().and_then(|i| i.last_error.clone())),
                    )),
                    counter(&ingest, |i| i.received),
                    counter(&ingest, |i| i.appended),
                    counter(&ingest, |i| i.acked),
                    counter(&ingest, |i| i.duplicates),
                    counter(&ingest, |i| i.rejected),
                    counter(&ingest, |i| i.reconnects),
                ]
            }
            SystemKind::SourceStats => {
                let s = weir.open_sources();
                let snaps: Vec<_> = s.iter().map(|s| s.stats.snapshot()).collect();
                vec![
                    strings(s.iter().map(|s| s.relation.name.clone())),
                    Arc::new(Int64Array::from_iter_values(
                        snaps.iter().map(|x| x.messages as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        snaps.iter().map(|x| x.dead_letters as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        snaps.iter().map(|x| x.late_rows as i64),
                    )),
                    Arc::new(TimestampNanosecondArray::from_iter(
                        snaps.iter().map(|x| x.watermark),
                    )),
                ]
            }
            SystemKind::LateRows => {
                let mut rows = Vec::new();
                for s in weir.open_sources() {
                    for l in s.stats.snapshot().late {
                        rows.push((s.relation.name.clone(), l));
                    }
                }
                vec![
                    strings(rows.iter().map(|(n, _)| n.clone())),
                    Arc::new(Int32Array::from_iter_values(
                        rows.iter().map(|(_, l)| l.partition as i32),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|(_, l)| l.offset as i64),
                    )),
                    Arc::new(TimestampNanosecondArray::from_iter_values(
                        rows.iter().map(|(_, l)| l.event_time),
                    )),
                    Arc::new(TimestampNanosecondArray::from_iter_values(
                        rows.iter().map(|(_, l)| l.watermark),
                    )),
                ]
            }
            SystemKind::DeadLetters => {
                let mut rows = Vec::new();
                for s in weir.open_sources() {
                    for d in s.stats.snapshot().dead {
                        rows.push((s.relation.name.clone(), d));
                    }
                }
                vec![
                    strings(rows.iter().map(|(n, _)| n.clone())),
                    Arc::new(Int32Array::from_iter_values(
                        rows.iter().map(|(_, d)| d.partition as i32),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|(_, d)| d.offset as i64),
                    )),
                    strings(rows.iter().map(|(_, d)| d.reason.clone())),
                    strings(rows.iter().map(|(_, d)| d.payload_prefix.clone())),
                ]
            }
            SystemKind::MaterializedViews => {
                let v = weir.open_views();
                let progress: Vec<_> = v
                    .iter()
                    .map(|v| {
                        v.output
                            .progress
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    })
                    .collect();
                vec![
                    strings(v.iter().map(|v| v.relation.name.clone())),
                    strings(v.iter().map(|v| {
                        if v.emit_on_window_close {
                            "on window close".to_string()
                        } else {
                            "updating".to_string()
                        }
                    })),
                    Arc::new(Int64Array::from_iter_values(
                        progress.iter().map(|p| p.rows as i64),
                    )),
                    strings(progress.iter().map(|p| match &p.error {
                        None => "running".to_string(),
                        Some(e) => format!("stopped: {e}"),
                    })),
                    strings(v.iter().map(|v| v.relation.sql.clone())),
                ]
            }
            SystemKind::Sinks => {
                let s = weir.open_sinks();
                let progress: Vec<_> = s
                    .iter()
                    .map(|s| s.progress.lock().unwrap_or_else(|p| p.into_inner()).clone())
                    .collect();
                let history: Vec<_> = s
                    .iter()
                    .map(|s| {
                        s.checkpoints
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone()
                    })
                    .collect();
                vec![
                    strings(s.iter().map(|s| s.relation.name.clone())),
                    strings(s.iter().map(|s| s.from.clone())),
                    strings(s.iter().map(|s| s.connector.clone())),
                    strings(s.iter().map(|s| s.target.clone())),
                    Arc::new(Int64Array::from_iter_values(
                        progress.iter().map(|p| p.rows as i64),
                    )),
                    strings(progress.iter().zip(&history).map(|(p, h)| {
                        match (&p.error, &h.last_error) {
                            (Some(e), _) => format!("stopped: {e}"),
                            (None, Some(e)) => format!("running; {e}"),
                            (None, None) => "running".to_string(),
                        }
                    })),
                    strings(s.iter().map(|s| s.delivery.to_string())),
                    Arc::new(Int64Array::from(
                        history
                            .iter()
                            .map(|h| h.recent.back().map(|m| m.epoch as i64))
                            .collect::<Vec<_>>(),
                    )),
                ]
            }
            SystemKind::Checkpoints => {
                let mut rows: Vec<(String, &'static str, crate::state::Manifest, bool)> =
                    Vec::new();
                let mut add =
                    |name: &str, kind: &'static str, h: &crate::stream::CheckpointHistory| {
                        for m in &h.recent {
                            rows.push((
                                name.to_string(),
                                kind,
                                m.clone(),
                                h.restored_epoch == Some(m.epoch),
                            ));
                        }
                    };
                for v in weir.open_views() {
                    let h = v
                        .checkpoints
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    add(&v.relation.name, "materialized view", &h);
                }
                for s in weir.open_sinks() {
                    let h = s
                        .checkpoints
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone();
                    add(&s.relation.name, "sink", &h);
                }
                vec![
                    strings(rows.iter().map(|r| r.0.clone())),
                    strings(rows.iter().map(|r| r.1.to_string())),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.2.epoch as i64),
                    )),
                    Arc::new(TimestampNanosecondArray::from_iter_values(
                        rows.iter()
                            .map(|r| r.2.taken_at_ms.saturating_mul(1_000_000)),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.2.duration_ms as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.2.bytes as i64),
                    )),
                    Arc::new(arrow::array::BooleanArray::from(
                        rows.iter().map(|r| r.2.incremental).collect::<Vec<_>>(),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.2.chain.len() as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        rows.iter().map(|r| r.2.chain_bytes() as i64),
                    )),
                    Arc::new(arrow::array::BooleanArray::from(
                        rows.iter().map(|r| r.3).collect::<Vec<_>>(),
                    )),
                ]
            }
            SystemKind::Topics => {
                let r = weir.topic_stats();
                vec![
                    Arc::new(StringArray::from_iter_values(
                        r.iter().map(|s| s.topic.clone()),
                    )),
                    Arc::new(Int32Array::from_iter_values(
                        r.iter().map(|s| s.partition as i32),
                    )),
                    Arc::new(Int32Array::from_iter_values(
                        r.iter().map(|s| s.partitions as i32),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.messages as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.topic_bytes as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.oldest_offset as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.next_offset as i64),
                    )),
                ]
            }
            SystemKind::Subscriptions => {
                let r = weir.subscription_stats();
                vec![
                    Arc::new(StringArray::from_iter_values(
                        r.iter().map(|s| s.subscription.clone()),
                    )),
                    Arc::new(StringArray::from_iter_values(r.iter().map(|s| s.mode))),
                    Arc::new(Int32Array::from_iter_values(
                        r.iter().map(|s| s.partition as i32),
                    )),
                    Arc::new(Int64Array::from_iter_values(r.iter().map(|s| s.lag as i64))),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.in_flight as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.redeliveries as i64),
                    )),
                    Arc::new(Int64Array::from_iter_values(
                        r.iter().map(|s| s.dead_lettered as i64),
                    )),
                ]
            }
        }
    }
}

fn ts() -> DataType {
    DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None)
}

fn strings(values: impl Iterator<Item = String>) -> ArrayRef {
    Arc::new(StringArray::from_iter_values(values))
}

/// A relation computed from the engine's state when scanned. Holds the engine
/// weakly: the engine's DataFusion context owns this table.
struct SystemTable {
    kind: SystemKind,
    weir: Weak<Inner>,
}

impl fmt::Debug for SystemTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SystemTable({})", self.kind.name())
    }
}

#[async_trait]
impl TableProvider for SystemTable {
    fn schema(&self) -> SchemaRef {
        self.kind.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    async fn scan(
        &self,
        _state: &dyn DfSession,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn ExecutionPlan>> {
        let inner = self
            .weir
            .upgrade()
            .ok_or_else(|| DataFusionError::Execution("the server is shutting down".to_string()))?;
        let weir = Weir { inner };
        let batch = RecordBatch::try_new(self.schema(), self.kind.rows(&weir))?;
        Ok(MemorySourceConfig::try_new_exec(
            &[vec![batch]],
            self.schema(),
            projection.cloned(),
        )?)
    }
}
