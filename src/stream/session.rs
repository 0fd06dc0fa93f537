//! [`SessionOperator`]: `SESSION(relation, time_column, gap [, key columns])` windows. Rows less
//! than `gap` apart (per key, or over the whole relation without keys) share a session, whose
//! window is `[first event time, last event time + gap)`. A row that falls between two
//! sessions merges them.
//!
//! Sessions are not row-local: a later row can extend or merge them. The operator keeps the
//! rows of every open session. Updating (eager) mode emits each row with its session's current
//! bounds and, when a session grows or merges, retracts the rows it emitted with the old
//! bounds; `EMIT ON WINDOW CLOSE` mode emits a session's rows once, when the watermark reaches
//! its end. Either way a session is freed when the watermark reaches its end: rows that could
//! still change it would be late, and windowed inputs drop late rows. The input must be
//! append-only. [`assign_sessions`] does the same for a whole batch (batch queries).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, Int64Array, RecordBatch, TimestampNanosecondArray, UInt32Array,
};
use arrow::compute::{SortColumn, concat_batches, lexsort_to_indices, take};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};

use super::{EventTime, Operator};
use crate::state::{SnapshotReader, SnapshotWriter};
use crate::types::{ChangeBatch, WeirError, WeirResult};

fn internal(context: &str) -> impl Fn(arrow::error::ArrowError) -> WeirError + '_ {
    move |e| WeirError::internal(format!("{context}: {e}"))
}

/// The input rows with `window_start`, `window_end` appended.
fn with_bounds(
    rows: &RecordBatch,
    start: i64,
    end: i64,
    schema: &SchemaRef,
) -> WeirResult<RecordBatch> {
    let n = rows.num_rows();
    let mut columns: Vec<ArrayRef> = rows.columns().to_vec();
    columns.push(Arc::new(TimestampNanosecondArray::from(vec![start; n])));
    columns.push(Arc::new(TimestampNanosecondArray::from(vec![end; n])));
    RecordBatch::try_new(schema.clone(), columns).map_err(internal("session window"))
}

fn times(rows: &RecordBatch, column: usize) -> WeirResult<&TimestampNanosecondArray> {
    rows.column(column)
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .ok_or_else(|| WeirError::internal("session time column is not timestamp(ns)"))
}

/// Sessions over a whole batch: `rows` with bounds appended, rows without an event time left
/// out. The same rule as the operator, so batch and streaming agree.
pub fn assign_sessions(
    rows: &RecordBatch,
    time_column: usize,
    keys: &[usize],
    gap_ns: i64,
    schema: &SchemaRef,
) -> WeirResult<RecordBatch> {
    let mut sort: Vec<SortColumn> = keys
        .iter()
        .map(|&k| SortColumn {
            values: rows.column(k).clone(),
            options: None,
        })
        .collect();
    sort.push(SortColumn {
        values: rows.column(time_column).clone(),
        options: None,
    });
    let order = lexsort_to_indices(&sort, None).map_err(internal("session sort"))?;
    let sorted =
        arrow::compute::take_record_batch(rows, &order).map_err(internal("session sort"))?;
    let key_rows = if keys.is_empty() {
        None
    } else {
        let converter = RowConverter::new(
            keys.iter()
                .map(|&k| SortField::new(rows.schema().field(k).data_type().clone()))
                .collect(),
        )
        .map_err(internal("session keys"))?;
        let cols: Vec<ArrayRef> = keys.iter().map(|&k| sorted.column(k).clone()).collect();
        Some(
            converter
                .convert_columns(&cols)
                .map_err(internal("session keys"))?,
        )
    };
    let t = times(&sorted, time_column)?;
    let n = sorted.num_rows();
    let mut keep = Vec::with_capacity(n);
    let mut starts = vec![0i64; n];
    let mut ends = vec![0i64; n];
    let mut i = 0;
    while i < n {
        if t.is_null(i) {
            i += 1;
            continue;
        }
        // One session: extend while the next row of the same key is closer than the gap.
        let mut j = i;
        while j + 1 < n
            && !t.is_null(j + 1)
            && key_rows.as_ref().is_none_or(|k| k.row(j + 1) == k.row(i))
            && t.value(j + 1).saturating_sub(t.value(j)) < gap_ns
        {
            j += 1;
        }
        for r in i..=j {
            starts[r] = t.value(i);
            ends[r] = t.value(j).saturating_add(gap_ns);
            keep.push(r as u32);
        }
        i = j + 1;
    }
    let keep = UInt32Array::from(keep);
    let mut columns: Vec<ArrayRef> = sorted
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &keep, None))
        .collect::<Result<_, _>>()
        .map_err(internal("session window"))?;
    let pick = |v: &[i64]| -> ArrayRef {
        Arc::new(TimestampNanosecondArray::from_iter_values(
            keep.values().iter().map(|&r| v[r as usize]),
        ))
    };
    columns.push(pick(&starts));
    columns.push(pick(&ends));
    RecordBatch::try_new(schema.clone(), columns).map_err(internal("session window"))
}

struct Session {
    start: EventTime,
    last: EventTime,
    rows: Vec<RecordBatch>,
    /// What was emitted for it (eager mode): bounds and how many leading rows.
    emitted: Option<(EventTime, EventTime, usize)>,
}

impl Session {
    fn end(&self, gap: i64) -> EventTime {
        self.last.saturating_add(gap)
    }
}

pub struct SessionOperator {
    time_column: usize,
    keys: Vec<usize>,
    key_names: Vec<String>,
    gap_ns: i64,
    /// Input schema + window_start, window_end.
    schema: SchemaRef,
    input_schema: SchemaRef,
    eager: bool,
    converter: Option<RowConverter>,
    /// Per key (row format; empty without keys): its open sessions.
    sessions: HashMap<Box<[u8]>, Vec<Session>>,
}

impl SessionOperator {
    pub fn try_new(
        time_column: usize,
        keys: Vec<usize>,
        gap_ns: i64,
        input_schema: SchemaRef,
        schema: SchemaRef,
        emit_on_window_close: bool,
    ) -> WeirResult<Self> {
        let converter = if keys.is_empty() {
            None
        } else {
            Some(
                RowConverter::new(
                    keys.iter()
                        .map(|&k| SortField::new(input_schema.field(k).data_type().clone()))
                        .collect(),
                )
                .map_err(internal("session keys"))?,
            )
        };
        let key_names = keys
            .iter()
            .map(|&k| input_schema.field(k).name().clone())
            .collect();
        Ok(SessionOperator {
            time_column,
            keys,
            key_names,
            gap_ns,
            schema,
            input_schema,
            eager: !emit_on_window_close,
            converter,
            sessions: HashMap::new(),
        })
    }

    /// Rows of one session with bounds, weight `w` for the first `count` rows (all if None).
    fn rows_of(
        &self,
        session: &Session,
        bounds: (EventTime, EventTime),
        count: Option<usize>,
    ) -> WeirResult<Option<RecordBatch>> {
        let all = concat_batches(&self.input_schema, &session.rows).map_err(internal("session"))?;
        let rows = match count {
            Some(c) => all.slice(0, c.min(all.num_rows())),
            None => all,
        };
        if rows.num_rows() == 0 {
            return Ok(None);
        }
        with_bounds(&rows, bounds.0, bounds.1, &self.schema).map(Some)
    }
}

fn weighted(
    batches: Vec<(RecordBatch, i64)>,
    schema: &SchemaRef,
) -> WeirResult<Option<ChangeBatch>> {
    if batches.is_empty() {
        return Ok(None);
    }
    let weights: Vec<i64> = batches
        .iter()
        .flat_map(|(b, w)| std::iter::repeat_n(*w, b.num_rows()))
        .collect();
    let rows: Vec<RecordBatch> = batches.into_iter().map(|(b, _)| b).collect();
    let rows = concat_batches(schema, &rows).map_err(internal("session output"))?;
    Ok(Some(ChangeBatch {
        rows,
        weights: Some(Int64Array::from(weights)),
    }))
}

impl Operator for SessionOperator {
    fn describe(&self) -> String {
        let keys = if self.key_names.is_empty() {
            String::new()
        } else {
            format!(" per {}", self.key_names.join(", "))
        };
        let mode = if self.eager {
            "updating"
        } else {
            "emit on window close"
        };
        format!(
            "SessionWindow: gap={}ms on column {}{keys}, {mode}",
            self.gap_ns / 1_000_000,
            self.input_schema.field(self.time_column).name()
        )
    }

    fn on_batch(
        &mut self,
        _input: usize,
        batch: ChangeBatch,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<()> {
        if batch
            .weights
            .as_ref()
            .is_some_and(|w| w.values().iter().any(|&x| x < 0))
        {
            return Err(WeirError::unsupported(
                "SESSION windows over rows that are deleted or updated are not supported",
                "use SESSION over a source (append-only)",
            ));
        }
        let rows = batch.rows;
        let t = times(&rows, self.time_column)?.clone();
        let keys = match &self.converter {
            Some(c) => {
                let cols: Vec<ArrayRef> =
                    self.keys.iter().map(|&k| rows.column(k).clone()).collect();
                Some(c.convert_columns(&cols).map_err(internal("session keys"))?)
            }
            None => None,
        };
        let gap = self.gap_ns;
        // Keys whose sessions this batch changed.
        let mut touched: Vec<Box<[u8]>> = Vec::new();
        let mut retractions: Vec<(RecordBatch, i64)> = Vec::new();
        for i in 0..rows.num_rows() {
            if t.is_null(i) {
                continue;
            }
            let ts = t.value(i);
            let key: Box<[u8]> = match &keys {
                Some(k) => k.row(i).as_ref().into(),
                None => Box::from(&[][..]),
            };
            let (hit, mut list): (Vec<Session>, Vec<Session>) = self
                .sessions
                .remove(&key)
                .unwrap_or_default()
                .into_iter()
                .partition(|s| ts < s.end(gap) && s.start < ts.saturating_add(gap));
            let mut merged = Session {
                start: ts,
                last: ts,
                rows: Vec::new(),
                emitted: None,
            };
            for s in hit {
                merged.start = merged.start.min(s.start);
                merged.last = merged.last.max(s.last);
                if let Some((start, end, count)) = s.emitted
                    && let Some(old) = self.rows_of(&s, (start, end), Some(count))?
                {
                    retractions.push((old, -1));
                }
                merged.rows.extend(s.rows);
            }
            merged.rows.push(rows.slice(i, 1));
            list.push(merged);
            self.sessions.insert(key.clone(), list);
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        if self.eager {
            let mut changes = retractions;
            for key in touched {
                let Some(list) = self.sessions.get_mut(&key) else {
                    continue;
                };
                let mut list = std::mem::take(list);
                for s in list.iter_mut() {
                    let bounds = (s.start, s.end(gap));
                    let n: usize = s.rows.iter().map(|r| r.num_rows()).sum();
                    match s.emitted {
                        Some((a, b, c)) if (a, b) == bounds && c == n => continue,
                        Some((a, b, c)) if (a, b) == bounds => {
                            // Same bounds, more rows: emit only the new ones.
                            let all = concat_batches(&self.input_schema, &s.rows)
                                .map_err(internal("session"))?;
                            let new = all.slice(c, n - c);
                            changes.push((with_bounds(&new, a, b, &self.schema)?, 1));
                        }
                        Some((a, b, c)) => {
                            if let Some(old) = self.rows_of(s, (a, b), Some(c))? {
                                changes.push((old, -1));
                            }
                            if let Some(new) = self.rows_of(s, bounds, None)? {
                                changes.push((new, 1));
                            }
                        }
                        None => {
                            if let Some(new) = self.rows_of(s, bounds, None)? {
                                changes.push((new, 1));
                            }
                        }
                    }
                    s.emitted = Some((bounds.0, bounds.1, n));
                }
                self.sessions.insert(key, list);
            }
            if let Some(change) = weighted(changes, &self.schema)? {
                out.push(change);
            }
        }
        Ok(())
    }

    fn on_watermark(
        &mut self,
        _input: usize,
        watermark: EventTime,
        out: &mut Vec<ChangeBatch>,
    ) -> WeirResult<Option<EventTime>> {
        let gap = self.gap_ns;
        let mut closed = Vec::new();
        for list in self.sessions.values_mut() {
            let (done, open): (Vec<Session>, Vec<Session>) = std::mem::take(list)
                .into_iter()
                .partition(|s| s.end(gap) <= watermark);
            *list = open;
            closed.extend(done);
        }
        self.sessions.retain(|_, l| !l.is_empty());
        if !self.eager {
            // Final rows in session order, so output is deterministic.
            closed.sort_by_key(|s| (s.start, s.last));
            let mut changes = Vec::new();
            for s in &closed {
                if let Some(rows) = self.rows_of(s, (s.start, s.end(gap)), None)? {
                    changes.push((rows, 1));
                }
            }
            if let Some(change) = weighted(changes, &self.schema)? {
                out.push(change);
            }
        }
        Ok(Some(watermark))
    }

    /// Every open session: its key, bounds, what was emitted, and its rows as one batch.
    fn snapshot(&mut self, out: &mut SnapshotWriter) -> WeirResult<()> {
        let total: usize = self.sessions.values().map(Vec::len).sum();
        out.u64(total as u64);
        let mut keys: Vec<&Box<[u8]>> = self.sessions.keys().collect();
        keys.sort();
        for key in keys {
            for session in &self.sessions[key] {
                out.bytes(key);
                out.i64(session.start);
                out.i64(session.last);
                match session.emitted {
                    Some((a, b, n)) => {
                        out.u64(1);
                        out.i64(a);
                        out.i64(b);
                        out.u64(n as u64);
                    }
                    None => out.u64(0),
                }
                let rows = concat_batches(&self.input_schema, &session.rows)
                    .map_err(internal("session snapshot"))?;
                out.batch(&rows)?;
            }
        }
        Ok(())
    }

    fn restore(&mut self, from: &mut SnapshotReader<'_>) -> WeirResult<()> {
        self.sessions.clear();
        for _ in 0..from.u64()? {
            let key: Box<[u8]> = from.bytes()?.into();
            let start = from.i64()?;
            let last = from.i64()?;
            let emitted = match from.u64()? {
                1 => Some((from.i64()?, from.i64()?, from.u64()? as usize)),
                _ => None,
            };
            let rows = from.batch()?;
            let rows = RecordBatch::try_new(self.input_schema.clone(), rows.columns().to_vec())
                .map_err(internal("session restore"))?;
            self.sessions.entry(key).or_default().push(Session {
                start,
                last,
                rows: vec![rows],
                emitted,
            });
        }
        Ok(())
    }
}
