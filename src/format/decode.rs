//! Message payloads ↔ Arrow rows for sources: JSON (arrow-json) and CSV (arrow-csv), one row
//! per message, decoded a batch of messages at a time.
//!
//! A batch decodes in one pass; only when that fails (or a message does not give exactly one
//! row) does it fall back to one message at a time to find the bad ones, which come back as
//! [`DecodeError`]s for the dead-letter table. Nothing here drops a message silently: every
//! input index is either a row of [`Decoded::rows`] or an entry of [`Decoded::errors`].
//!
//! `TIMESTAMP` columns accept RFC 3339 / ISO 8601 text (`2026-01-01T10:00:01Z`,
//! `2026-01-01 10:00:01`) and epoch milliseconds as a number. They are decoded as text first
//! and converted here, because arrow-json would read a number as nanoseconds.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampNanosecondArray};
use arrow::compute::concat_batches;
use arrow::compute::kernels::cast_utils::string_to_timestamp_nanos;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

use crate::types::{SqlState, WeirError, WeirResult};

/// How a source's messages are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceFormat {
    /// One JSON object per message; missing fields are NULL, extra fields ignored.
    Json,
    /// One CSV record per message, columns in declaration order, no header.
    Csv,
}

impl SourceFormat {
    pub fn parse(name: &str) -> WeirResult<SourceFormat> {
        match name.to_ascii_uppercase().as_str() {
            "JSON" => Ok(SourceFormat::Json),
            "CSV" => Ok(SourceFormat::Csv),
            other => Err(WeirError::new(
                SqlState::INVALID_PARAMETER_VALUE,
                format!("unknown source format \"{other}\""),
            )
            .with_hint("use FORMAT JSON or FORMAT CSV")),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SourceFormat::Json => "JSON",
            SourceFormat::Csv => "CSV",
        }
    }
}

/// Why one message could not become a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Index of the message in the input slice.
    pub index: usize,
    pub reason: String,
}

/// The rows of the messages that decoded, in input order.
#[derive(Debug)]
pub struct Decoded {
    /// One row per good message, with the decoder's schema.
    pub rows: RecordBatch,
    /// For each row, the index of its message in the input.
    pub indices: Vec<usize>,
    pub errors: Vec<DecodeError>,
}

/// Decodes payloads into rows of `schema`. Columns named in `required` must not be NULL (the
/// event-time column): a message without one is an error, not a row.
#[derive(Debug, Clone)]
pub struct RowDecoder {
    format: SourceFormat,
    schema: SchemaRef,
    /// `schema` with TIMESTAMP columns as text, what arrow-json/arrow-csv decode into.
    wire: SchemaRef,
    timestamps: Vec<usize>,
    required: Vec<usize>,
}

impl RowDecoder {
    pub fn try_new(
        format: SourceFormat,
        schema: SchemaRef,
        required: Vec<usize>,
    ) -> WeirResult<RowDecoder> {
        let mut timestamps = Vec::new();
        let fields: Vec<Field> = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| match f.data_type() {
                DataType::Timestamp(TimeUnit::Nanosecond, None) => {
                    timestamps.push(i);
                    Field::new(f.name(), DataType::Utf8, true)
                }
                DataType::Timestamp(..) => {
                    timestamps.push(i);
                    Field::new(f.name(), DataType::Utf8, true)
                }
                _ => Field::new(f.name(), f.data_type().clone(), true),
            })
            .collect();
        for &i in &timestamps {
            if schema.field(i).data_type() != &DataType::Timestamp(TimeUnit::Nanosecond, None) {
                return Err(WeirError::unsupported(
                    format!(
                        "column \"{}\" has a timestamp type sources do not decode",
                        schema.field(i).name()
                    ),
                    "declare event-time columns as TIMESTAMP",
                ));
            }
        }
        Ok(RowDecoder {
            format,
            schema,
            wire: Arc::new(Schema::new(fields)),
            timestamps,
            required,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Decodes every payload; bad ones become [`DecodeError`]s.
    pub fn decode(&self, payloads: &[&[u8]]) -> WeirResult<Decoded> {
        if let Ok(Some(batch)) = self.decode_wire(payloads)
            && batch.num_rows() == payloads.len()
        {
            return self.finish(batch, (0..payloads.len()).collect(), Vec::new());
        }
        // Slow path: one message at a time, to tell the good from the bad.
        let mut batches = Vec::new();
        let mut indices = Vec::new();
        let mut errors = Vec::new();
        for (index, payload) in payloads.iter().enumerate() {
            match self.decode_wire(&[payload]) {
                Ok(Some(batch)) if batch.num_rows() == 1 => {
                    batches.push(batch);
                    indices.push(index);
                }
                Ok(Some(batch)) if batch.num_rows() > 1 => errors.push(DecodeError {
                    index,
                    reason: format!(
                        "message holds {} records; a source takes one per message",
                        batch.num_rows()
                    ),
                }),
                Ok(_) => errors.push(DecodeError {
                    index,
                    reason: "empty message".to_string(),
                }),
                Err(e) => errors.push(DecodeError {
                    index,
                    reason: e.to_string(),
                }),
            }
        }
        let batch = concat_batches(&self.wire, &batches)
            .map_err(|e| WeirError::internal(format!("concatenating decoded rows: {e}")))?;
        self.finish(batch, indices, errors)
    }

    fn decode_wire(&self, payloads: &[&[u8]]) -> Result<Option<RecordBatch>, String> {
        match self.format {
            SourceFormat::Json => {
                let mut decoder = arrow::json::ReaderBuilder::new(self.wire.clone())
                    .with_coerce_primitive(true)
                    .with_batch_size(payloads.len().max(1))
                    .build_decoder()
                    .map_err(|e| e.to_string())?;
                for payload in payloads {
                    let n = decoder.decode(payload).map_err(|e| e.to_string())?;
                    if n != payload.len() {
                        return Err("message is longer than one JSON document".to_string());
                    }
                    decoder.decode(b"\n").map_err(|e| e.to_string())?;
                }
                decoder.flush().map_err(|e| e.to_string())
            }
            SourceFormat::Csv => {
                let mut decoder = arrow::csv::ReaderBuilder::new(self.wire.clone())
                    .with_header(false)
                    .with_batch_size(payloads.len().max(1))
                    .build_decoder();
                for payload in payloads {
                    let line = payload.strip_suffix(b"\n").unwrap_or(payload);
                    if line.contains(&b'\n') {
                        return Err("message holds more than one CSV line".to_string());
                    }
                    feed_csv(&mut decoder, line)?;
                    feed_csv(&mut decoder, b"\n")?;
                }
                decoder.flush().map_err(|e| e.to_string())
            }
        }
    }

    /// Converts text timestamps and checks required columns; rows that fail become errors.
    fn finish(
        &self,
        wire: RecordBatch,
        mut indices: Vec<usize>,
        mut errors: Vec<DecodeError>,
    ) -> WeirResult<Decoded> {
        let n = wire.num_rows();
        let mut bad = vec![None::<String>; n];
        let mut columns: Vec<ArrayRef> = wire.columns().to_vec();
        for &c in &self.timestamps {
            let text = wire
                .column(c)
                .as_any()
                .downcast_ref::<StringArray>()
                .ok_or_else(|| WeirError::internal("timestamp decoded as non-text"))?;
            let mut values = Vec::with_capacity(n);
            for (row, value) in text.iter().enumerate() {
                values.push(match value {
                    None => None,
                    Some(v) => match parse_timestamp(v) {
                        Ok(ns) => Some(ns),
                        Err(reason) => {
                            bad[row].get_or_insert(format!(
                                "column \"{}\": {reason}",
                                self.schema.field(c).name()
                            ));
                            None
                        }
                    },
                });
            }
            columns[c] = Arc::new(TimestampNanosecondArray::from(values));
        }
        for &c in &self.required {
            let column = &columns[c];
            if column.null_count() > 0 {
                for (row, slot) in bad.iter_mut().enumerate() {
                    if column.is_null(row) {
                        slot.get_or_insert(format!(
                            "event-time column \"{}\" is missing or NULL",
                            self.schema.field(c).name()
                        ));
                    }
                }
            }
        }
        let batch = RecordBatch::try_new(self.schema_nullable(), columns)
            .map_err(|e| WeirError::internal(format!("decoded rows: {e}")))?;
        if bad.iter().all(Option::is_none) {
            return Ok(Decoded {
                rows: batch,
                indices,
                errors,
            });
        }
        let keep: arrow::array::BooleanArray = bad.iter().map(|b| Some(b.is_none())).collect();
        for (row, reason) in bad.into_iter().enumerate() {
            if let Some(reason) = reason {
                errors.push(DecodeError {
                    index: indices[row],
                    reason,
                });
            }
        }
        errors.sort_by_key(|e| e.index);
        let rows = arrow::compute::filter_record_batch(&batch, &keep)
            .map_err(|e| WeirError::internal(format!("filtering decoded rows: {e}")))?;
        let mut kept = keep.values().iter();
        indices.retain(|_| kept.next().unwrap_or(false));
        Ok(Decoded {
            rows,
            indices,
            errors,
        })
    }

    fn schema_nullable(&self) -> SchemaRef {
        Arc::new(Schema::new(
            self.schema
                .fields()
                .iter()
                .map(|f| f.as_ref().clone().with_nullable(true))
                .collect::<Vec<_>>(),
        ))
    }
}

fn feed_csv(decoder: &mut arrow::csv::reader::Decoder, bytes: &[u8]) -> Result<(), String> {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = decoder.decode(rest).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("CSV decoder made no progress".to_string());
        }
        rest = &rest[n..];
    }
    Ok(())
}

/// Epoch milliseconds (a whole number) or ISO 8601 / RFC 3339 text → nanoseconds since the epoch.
pub fn parse_timestamp(text: &str) -> Result<i64, String> {
    let t = text.trim();
    if let Ok(ms) = t.parse::<i64>() {
        return ms
            .checked_mul(1_000_000)
            .ok_or_else(|| format!("epoch milliseconds {ms} are out of range"));
    }
    string_to_timestamp_nanos(t).map_err(|_| format!("\"{t}\" is not a timestamp"))
}

/// Rows → one JSON object per row (arrow-json), for `INSERT INTO source`.
pub fn encode_json(batch: &RecordBatch) -> WeirResult<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    {
        let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
        writer
            .write(batch)
            .map_err(|e| WeirError::internal(format!("encoding JSON: {e}")))?;
        writer
            .finish()
            .map_err(|e| WeirError::internal(format!("encoding JSON: {e}")))?;
    }
    Ok(out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}

/// Rows → one CSV line per row (arrow-csv), for `INSERT INTO source`.
pub fn encode_csv(batch: &RecordBatch) -> WeirResult<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    {
        let mut writer = arrow::csv::WriterBuilder::new()
            .with_header(false)
            .build(&mut out);
        writer
            .write(batch)
            .map_err(|e| WeirError::internal(format!("encoding CSV: {e}")))?;
    }
    Ok(out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(<[u8]>::to_vec)
        .collect())
}
