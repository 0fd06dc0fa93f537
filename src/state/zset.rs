//! [`ZSetState`]: a multiset of rows stored as Arrow batches, changed by
//! weighted [`ChangeBatch`]es.
//!
//! Inserts append (coalescing small batches so scans stay batch-sized);
//! retractions find equal rows through Arrow's row format and filter them out,
//! a batch at a time. The optional primary-key index holds the encoded key of
//! every live row so uniqueness is checked before a change is logged.

use std::collections::{HashMap, HashSet};

use arrow::array::{Array, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, filter_record_batch, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::row::{RowConverter, SortField};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::types::{ChangeBatch, SqlState, WeirError, WeirResult};

/// Batches smaller than this are merged with the next insert.
const COALESCE_ROWS: usize = 8192;

/// The consolidated contents of a table: every stored row has weight +1.
#[derive(Debug)]
pub struct ZSetState {
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
    rows: usize,
    primary_key: Option<KeyIndex>,
}

#[derive(Debug)]
struct KeyIndex {
    columns: Vec<usize>,
    converter: RowConverter,
    keys: HashSet<Vec<u8>>,
}

fn arrow_err(context: &str) -> impl Fn(arrow::error::ArrowError) -> WeirError + '_ {
    move |e| WeirError::internal(format!("{context}: {e}"))
}

fn row_converter(schema: &SchemaRef, columns: &[usize]) -> WeirResult<RowConverter> {
    let fields = columns
        .iter()
        .map(|&i| SortField::new(schema.field(i).data_type().clone()))
        .collect();
    RowConverter::new(fields).map_err(|e| {
        WeirError::unsupported(
            format!("column types cannot be compared for equality: {e}"),
            "use scalar column types (numbers, text, timestamps) for keys",
        )
    })
}

impl ZSetState {
    /// An empty state; `primary_key` lists key column indices (empty = none).
    pub fn try_new(schema: SchemaRef, primary_key: Vec<usize>) -> WeirResult<Self> {
        let primary_key = if primary_key.is_empty() {
            None
        } else {
            Some(KeyIndex {
                converter: row_converter(&schema, &primary_key)?,
                columns: primary_key,
                keys: HashSet::new(),
            })
        };
        Ok(ZSetState {
            schema,
            batches: Vec::new(),
            rows: 0,
            primary_key,
        })
    }

    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The current rows; cheap (batches share buffers).
    pub fn snapshot(&self) -> Vec<RecordBatch> {
        self.batches.clone()
    }

    pub fn num_rows(&self) -> usize {
        self.rows
    }

    /// Checks that applying `change` keeps the primary key unique and the
    /// NOT NULL columns filled, without changing anything. Errors are the
    /// client's (23505, 23502).
    pub fn check(&self, change: &ChangeBatch) -> WeirResult<()> {
        let (inserts, deletes) = split_by_sign(change)?;
        if let Some(inserts) = &inserts {
            for (idx, field) in self.schema.fields().iter().enumerate() {
                if !field.is_nullable() && inserts.column(idx).null_count() > 0 {
                    return Err(WeirError::new(
                        SqlState::NOT_NULL_VIOLATION,
                        format!(
                            "null value in column \"{}\" violates not-null constraint",
                            field.name()
                        ),
                    )
                    .with_hint("give the column a value, or drop NOT NULL from its definition"));
                }
            }
        }
        let (Some(index), Some(inserts)) = (&self.primary_key, &inserts) else {
            return Ok(());
        };
        let removed: HashSet<Vec<u8>> = match &deletes {
            Some(d) => index.encode(d)?.into_iter().collect(),
            None => HashSet::new(),
        };
        let mut added = HashSet::new();
        for (row, key) in index.encode(inserts)?.into_iter().enumerate() {
            let taken =
                (index.keys.contains(&key) && !removed.contains(&key)) || !added.insert(key);
            if taken {
                return Err(index.duplicate_error(&self.schema, inserts, row));
            }
        }
        Ok(())
    }

    /// Applies a change that [`ZSetState::check`] accepted (or that was
    /// already accepted once, during log replay). A retraction of a row that
    /// is not present means the log and state disagree: an error, not a panic.
    pub fn apply(&mut self, change: &ChangeBatch) -> WeirResult<()> {
        let (inserts, deletes) = split_by_sign(change)?;
        if let Some(deletes) = deletes {
            self.retract(&deletes)?;
        }
        if let Some(inserts) = inserts {
            self.insert(inserts)?;
        }
        Ok(())
    }

    fn insert(&mut self, rows: RecordBatch) -> WeirResult<()> {
        if rows.num_rows() == 0 {
            return Ok(());
        }
        // try_new re-validates NOT NULL against the table's own schema.
        let rows = RecordBatch::try_new(self.schema.clone(), rows.columns().to_vec())
            .map_err(arrow_err("inserted rows do not match the table"))?;
        if let Some(index) = &mut self.primary_key {
            for key in index.encode(&rows)? {
                index.keys.insert(key);
            }
        }
        self.rows += rows.num_rows();
        match self.batches.last_mut() {
            Some(last) if last.num_rows() + rows.num_rows() <= COALESCE_ROWS => {
                *last = concat_batches(&self.schema, [&*last, &rows])
                    .map_err(arrow_err("coalescing batches"))?;
            }
            _ => self.batches.push(rows),
        }
        Ok(())
    }

    fn retract(&mut self, rows: &RecordBatch) -> WeirResult<()> {
        let all: Vec<usize> = (0..self.schema.fields().len()).collect();
        let converter = row_converter(&self.schema, &all)?;
        let wanted = converter
            .convert_columns(rows.columns())
            .map_err(arrow_err("encoding retracted rows"))?;
        let mut pending: HashMap<Vec<u8>, usize> = HashMap::new();
        for row in wanted.iter() {
            *pending.entry(row.as_ref().to_vec()).or_default() += 1;
        }
        let mut remaining = rows.num_rows();
        let mut kept = Vec::with_capacity(self.batches.len());
        // Newest first: what is retracted is usually recent (a view's group that changed, an
        // open window), so the search stops before the old batches are even encoded.
        for batch in self.batches.drain(..).rev() {
            if remaining == 0 {
                kept.push(batch);
                continue;
            }
            let encoded = converter
                .convert_columns(batch.columns())
                .map_err(arrow_err("encoding stored rows"))?;
            let mask: BooleanArray = encoded
                .iter()
                .map(|row| match pending.get_mut(row.as_ref()) {
                    Some(n) if *n > 0 => {
                        *n -= 1;
                        remaining -= 1;
                        Some(false)
                    }
                    _ => Some(true),
                })
                .collect();
            let filtered =
                filter_record_batch(&batch, &mask).map_err(arrow_err("filtering rows"))?;
            if filtered.num_rows() > 0 {
                kept.push(filtered);
            }
        }
        kept.reverse();
        self.batches = kept;
        if remaining > 0 {
            return Err(WeirError::new(
                SqlState::DATA_CORRUPTED,
                format!("{remaining} retracted rows are not present in the table"),
            ));
        }
        self.rows -= rows.num_rows();
        if let Some(index) = &mut self.primary_key {
            for key in index.encode(rows)? {
                index.keys.remove(&key);
            }
        }
        Ok(())
    }
}

impl KeyIndex {
    fn encode(&self, batch: &RecordBatch) -> WeirResult<Vec<Vec<u8>>> {
        let columns: Vec<_> = self
            .columns
            .iter()
            .map(|&i| batch.column(i).clone())
            .collect();
        let rows = self
            .converter
            .convert_columns(&columns)
            .map_err(arrow_err("encoding key"))?;
        Ok(rows.iter().map(|r| r.as_ref().to_vec()).collect())
    }

    fn duplicate_error(&self, schema: &SchemaRef, batch: &RecordBatch, row: usize) -> WeirError {
        let names: Vec<&str> = self
            .columns
            .iter()
            .map(|&i| schema.field(i).name().as_str())
            .collect();
        let options = FormatOptions::default().with_null("NULL");
        let values: Vec<String> = self
            .columns
            .iter()
            .map(|&i| {
                ArrayFormatter::try_new(batch.column(i).as_ref(), &options)
                    .map(|f| f.value(row).to_string())
                    .unwrap_or_else(|_| "?".to_string())
            })
            .collect();
        WeirError::new(
            SqlState::UNIQUE_VIOLATION,
            "duplicate key value violates unique constraint",
        )
        .with_detail(format!(
            "Key ({})=({}) already exists.",
            names.join(", "),
            values.join(", ")
        ))
        .with_hint("use UPDATE to change the existing row, or DELETE it first")
    }
}

/// Splits a change into its inserted rows and its retracted rows; a weight of
/// n > 1 stands for n copies.
fn split_by_sign(change: &ChangeBatch) -> WeirResult<(Option<RecordBatch>, Option<RecordBatch>)> {
    let Some(weights) = &change.weights else {
        return Ok((Some(change.rows.clone()), None));
    };
    let mut plus = Vec::new();
    let mut minus = Vec::new();
    for (row, w) in weights.values().iter().enumerate() {
        let target = if *w > 0 { &mut plus } else { &mut minus };
        for _ in 0..w.unsigned_abs() {
            target.push(row as u32);
        }
    }
    let pick = |indices: Vec<u32>| -> WeirResult<Option<RecordBatch>> {
        if indices.is_empty() {
            return Ok(None);
        }
        let indices = UInt32Array::from(indices);
        take_record_batch(&change.rows, &indices)
            .map(Some)
            .map_err(arrow_err("splitting change batch"))
    };
    Ok((pick(plus)?, pick(minus)?))
}

/// The net effect of `changes` (rows of `schema`): each distinct row once, with the sum of
/// its weights, rows whose weights cancel left out; `None` when everything cancels. One pass
/// over Arrow's row format, so a checkpoint's changes and recovery's chain cost linear time.
pub fn consolidate(schema: &SchemaRef, changes: &[ChangeBatch]) -> WeirResult<Option<ChangeBatch>> {
    let all: Vec<usize> = (0..schema.fields().len()).collect();
    let converter = row_converter(schema, &all)?;
    // Distinct row → its slot in `net`: (summed weight, batch, row of its first copy).
    let mut slots: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut net: Vec<(i64, usize, usize)> = Vec::new();
    for (b, change) in changes.iter().enumerate() {
        let rows = converter
            .convert_columns(change.rows.columns())
            .map_err(arrow_err("encoding changes"))?;
        for (r, row) in rows.iter().enumerate() {
            let w = change.weights.as_ref().map_or(1, |w| w.value(r));
            match slots.get(row.as_ref()) {
                Some(&slot) => net[slot].0 += w,
                None => {
                    slots.insert(row.as_ref().to_vec(), net.len());
                    net.push((w, b, r));
                }
            }
        }
    }
    let (indices, weights): (Vec<(usize, usize)>, Vec<i64>) = net
        .into_iter()
        .filter(|(w, _, _)| *w != 0)
        .map(|(w, b, r)| ((b, r), w))
        .unzip();
    if indices.is_empty() {
        return Ok(None);
    }
    let batches: Vec<&RecordBatch> = changes.iter().map(|c| &c.rows).collect();
    let rows = arrow::compute::interleave_record_batch(&batches, &indices)
        .map_err(arrow_err("gathering changes"))?;
    Ok(Some(ChangeBatch {
        rows,
        weights: Some(arrow::array::Int64Array::from(weights)),
    }))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn change(keys: &[&str], values: &[i64], weights: &[i64]) -> ChangeBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("k", DataType::Utf8, false),
            Field::new("v", DataType::Int64, false),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(keys.to_vec())),
                Arc::new(Int64Array::from(values.to_vec())),
            ],
        )
        .unwrap();
        ChangeBatch {
            rows,
            weights: Some(Int64Array::from(weights.to_vec())),
        }
    }

    fn as_tuples(c: &ChangeBatch) -> Vec<(String, i64, i64)> {
        let k = c
            .rows
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        let v = c
            .rows
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let w = c.weights.as_ref().unwrap();
        let mut out: Vec<_> = (0..c.rows.num_rows())
            .map(|i| (k.value(i).to_string(), v.value(i), w.value(i)))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn consolidate_nets_out_updates_and_keeps_the_rest() {
        // a: 1 → 2 → 3 (two updates), b inserted then deleted, c inserted twice.
        let changes = [
            change(&["a", "b", "c"], &[1, 5, 7], &[1, 1, 1]),
            change(&["a", "a", "b"], &[1, 2, 5], &[-1, 1, -1]),
            change(&["a", "a", "c"], &[2, 3, 7], &[-1, 1, 1]),
        ];
        let schema = changes[0].rows.schema();
        let net = consolidate(&schema, &changes).unwrap().unwrap();
        assert_eq!(
            as_tuples(&net),
            vec![("a".into(), 3, 1), ("c".into(), 7, 2)]
        );
        let gone = [change(&["x"], &[1], &[1]), change(&["x"], &[1], &[-1])];
        assert!(consolidate(&schema, &gone).unwrap().is_none());
        // Applied to a state, the consolidated rows equal applying each change in turn.
        let mut stepwise = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        for c in &changes {
            stepwise.apply(c).unwrap();
        }
        let mut at_once = ZSetState::try_new(schema.clone(), vec![]).unwrap();
        at_once.apply(&net).unwrap();
        assert_eq!(stepwise.num_rows(), at_once.num_rows());
        let all = |s: &ZSetState| {
            let batches: Vec<ChangeBatch> =
                s.snapshot().into_iter().map(ChangeBatch::inserts).collect();
            consolidate(&schema, &batches)
                .unwrap()
                .map(|c| as_tuples(&c))
        };
        assert_eq!(all(&stepwise), all(&at_once));
    }
}
