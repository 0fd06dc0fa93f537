//! Weir's own storage as sources: a built-in topic read as a source ([`TopicSource`]: one more
//! reader of the topic, at its own offsets) and a table's change log ([`TableSource`]: inserts
//! and retractions, in commit order); and a topic as a sink ([`TopicSink`], `sink.rs`).

mod sink;

pub use sink::TopicSink;

use std::sync::Arc;

use arrow::array::{ArrayRef, Int32Array, Int64Array, RecordBatch, TimestampNanosecondArray};
use arrow::compute::concat_batches;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use tokio::sync::Notify;

use super::api::{BadMessage, Source, SourceChunk};
use crate::format::decode::{RowDecoder, SourceFormat};
use crate::format::ipc::decode_change;
use crate::queue::{Log, Topic};
use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// Metadata columns a source can declare; they are filled from the message, not its payload.
pub const METADATA_COLUMNS: &[(&str, DataType)] = &[
    ("_partition", DataType::Int32),
    ("_offset", DataType::Int64),
    (
        "_timestamp",
        DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
    ),
];

const PAYLOAD_PREFIX_BYTES: usize = 256;

/// Reads a topic's partitions from chosen offsets and decodes each message into a row.
pub struct TopicSource {
    topic: Arc<Topic>,
    schema: SchemaRef,
    decoder: RowDecoder,
    /// For each column of `schema`: `Some(i)` = the i-th metadata column, `None` = from payload.
    columns: Vec<Option<usize>>,
    positions: Vec<u64>,
    /// The partition to read next (partitions take turns so none starves).
    turn: usize,
}

impl TopicSource {
    /// `schema` is the source's declared columns; `required` names columns (by index into
    /// `schema`) that must not be NULL. Reads from the oldest retained message.
    pub fn try_new(
        topic: Arc<Topic>,
        schema: SchemaRef,
        format: SourceFormat,
        required: Vec<usize>,
    ) -> WeirResult<TopicSource> {
        let mut columns = Vec::new();
        let mut payload_fields = Vec::new();
        let mut payload_index = Vec::new();
        for field in schema.fields() {
            match METADATA_COLUMNS
                .iter()
                .position(|(name, _)| name == field.name())
            {
                Some(m) => {
                    if field.data_type() != &METADATA_COLUMNS[m].1 {
                        return Err(WeirError::new(
                            SqlState::DATATYPE_MISMATCH,
                            format!(
                                "metadata column \"{}\" must have type {}",
                                field.name(),
                                METADATA_COLUMNS[m].1
                            ),
                        )
                        .with_hint(
                            "declare _partition INT, _offset BIGINT, _timestamp TIMESTAMP",
                        ));
                    }
                    columns.push(Some(m));
                }
                None => {
                    payload_index.push(payload_fields.len());
                    payload_fields.push(field.as_ref().clone());
                    columns.push(None);
                }
            }
        }
        // Required columns by their index among the payload columns.
        let mut payload_required = Vec::new();
        let mut next_payload = 0;
        for (i, c) in columns.iter().enumerate() {
            if c.is_none() {
                if required.contains(&i) {
                    payload_required.push(next_payload);
                }
                next_payload += 1;
            }
        }
        let decoder = RowDecoder::try_new(
            format,
            Arc::new(Schema::new(payload_fields)),
            payload_required,
        )?;
        let positions = (0..topic.partitions())
            .map(|p| topic.start_offset(p))
            .collect();
        Ok(TopicSource {
            topic,
            schema,
            decoder,
            columns,
            positions,
            turn: 0,
        })
    }
}

#[async_trait]
impl Source for TopicSource {
    fn poll(&mut self, max_messages: usize) -> WeirResult<Option<SourceChunk>> {
        let n = self.positions.len();
        for step in 0..n {
            let partition = (self.turn + step) % n;
            let from = self.positions[partition];
            let records = self
                .topic
                .read(partition as u32, from, max_messages.max(1))
                .map_err(|e| WeirError::new(SqlState::IO_ERROR, e.to_string()))?;
            let Some(last) = records.last() else { continue };
            self.positions[partition] = last.offset + 1;
            self.turn = (partition + 1) % n;
            let payloads: Vec<&[u8]> = records.iter().map(|r| r.payload.as_ref()).collect();
            let decoded = self.decoder.decode(&payloads)?;
            let bad = decoded
                .errors
                .iter()
                .map(|e| {
                    let payload = &records[e.index].payload;
                    let cut = payload.len().min(PAYLOAD_PREFIX_BYTES);
                    BadMessage {
                        partition: partition as u32,
                        offset: records[e.index].offset,
                        reason: e.reason.clone(),
                        payload_prefix: String::from_utf8_lossy(&payload[..cut]).into_owned(),
                    }
                })
                .collect();
            let offsets: Vec<u64> = decoded.indices.iter().map(|&i| records[i].offset).collect();
            let mut payload_columns = decoded.rows.columns().iter();
            let mut arrays: Vec<ArrayRef> = Vec::with_capacity(self.columns.len());
            for column in &self.columns {
                arrays.push(match column {
                    None => payload_columns.next().cloned().ok_or_else(|| {
                        WeirError::internal("decoded fewer columns than declared")
                    })?,
                    Some(0) => Arc::new(Int32Array::from(vec![
                        partition as i32;
                        decoded.indices.len()
                    ])),
                    Some(1) => Arc::new(Int64Array::from_iter_values(
                        offsets.iter().map(|&o| o as i64),
                    )),
                    Some(_) => Arc::new(TimestampNanosecondArray::from_iter_values(
                        decoded
                            .indices
                            .iter()
                            .map(|&i| records[i].timestamp_ms.saturating_mul(1_000_000)),
                    )),
                });
            }
            let rows = RecordBatch::try_new(nullable(&self.schema), arrays)
                .map_err(|e| WeirError::internal(format!("source rows: {e}")))?;
            return Ok(Some(SourceChunk {
                partition: partition as u32,
                changes: ChangeBatch::inserts(rows),
                offsets,
                bad,
            }));
        }
        Ok(None)
    }

    fn positions(&self) -> Vec<u64> {
        self.positions.clone()
    }

    fn published(&self) -> Vec<u64> {
        (0..self.topic.partitions())
            .map(|p| self.topic.end_offset(p))
            .collect()
    }

    async fn wait(&self, deadline: tokio::time::Instant) {
        self.topic
            .wait_for_messages(&self.positions, deadline)
            .await;
    }

    fn append_only(&self) -> bool {
        true
    }

    fn seek(&mut self, positions: &[u64]) -> WeirResult<()> {
        if positions.len() != self.positions.len() {
            return Err(WeirError::internal(format!(
                "checkpoint has {} partitions, topic \"{}\" {}",
                positions.len(),
                self.topic.name(),
                self.positions.len()
            )));
        }
        for (p, &at) in positions.iter().enumerate() {
            let oldest = self.topic.start_offset(p as u32);
            if at < oldest {
                tracing::warn!(
                    topic = self.topic.name(),
                    partition = p,
                    from = at,
                    oldest,
                    "checkpoint position is no longer retained; resuming at the oldest message"
                );
            }
            self.positions[p] = at.max(oldest);
        }
        Ok(())
    }
}

/// Reads a table's change log: every committed INSERT, UPDATE and DELETE as weighted rows.
pub struct TableSource {
    log: Arc<Log>,
    schema: SchemaRef,
    next: u64,
    /// Notified by the table's writer after each committed change; never closed.
    changed: Arc<Notify>,
}

impl TableSource {
    pub fn new(log: Arc<Log>, schema: SchemaRef, changed: Arc<Notify>) -> TableSource {
        let next = log.start_offset();
        TableSource {
            log,
            schema,
            next,
            changed,
        }
    }
}

#[async_trait]
impl Source for TableSource {
    fn poll(&mut self, max_messages: usize) -> WeirResult<Option<SourceChunk>> {
        let records = self
            .log
            .read(self.next, max_messages.max(1), 64 << 20)
            .map_err(|e| WeirError::new(SqlState::IO_ERROR, e.to_string()))?;
        let Some(last) = records.last() else {
            return Ok(None);
        };
        self.next = last.offset + 1;
        let schema = nullable(&self.schema);
        let mut batches = Vec::new();
        let mut weights: Vec<i64> = Vec::new();
        let mut offsets = Vec::new();
        for record in &records {
            for change in decode_change(&record.payload)? {
                let rows = RecordBatch::try_new(schema.clone(), change.rows.columns().to_vec())
                    .map_err(|e| {
                        WeirError::new(
                            SqlState::DATA_CORRUPTED,
                            format!("table log record does not match the table: {e}"),
                        )
                    })?;
                match &change.weights {
                    Some(w) => weights.extend(w.values().iter()),
                    None => weights.extend(std::iter::repeat_n(1, rows.num_rows())),
                }
                offsets.extend(std::iter::repeat_n(record.offset, rows.num_rows()));
                batches.push(rows);
            }
        }
        let rows = concat_batches(&schema, &batches)
            .map_err(|e| WeirError::internal(format!("table changes: {e}")))?;
        Ok(Some(SourceChunk {
            partition: 0,
            changes: ChangeBatch {
                rows,
                weights: Some(Int64Array::from(weights)),
            },
            offsets,
            bad: Vec::new(),
        }))
    }

    fn positions(&self) -> Vec<u64> {
        vec![self.next]
    }

    fn published(&self) -> Vec<u64> {
        vec![self.log.next_offset()]
    }

    async fn wait(&self, deadline: tokio::time::Instant) {
        let notified = self.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.log.next_offset() > self.next {
            return;
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }

    fn append_only(&self) -> bool {
        false
    }

    fn seek(&mut self, positions: &[u64]) -> WeirResult<()> {
        let at = positions.first().copied().unwrap_or(0);
        // A table's log keeps every change it still needs; nothing older is dropped while the
        // table exists, so `at` is retained.
        self.next = at.max(self.log.start_offset());
        Ok(())
    }
}

fn nullable(schema: &SchemaRef) -> SchemaRef {
    Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ))
}
